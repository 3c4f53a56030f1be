"""The catalog of inference backends; each is imported only when asked for."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from worker.backends.base import Backend, BackendOptionError

# name -> "module:Class". Imported lazily so a hive can list backends without
# importing heavy engines.
_BACKENDS: dict[str, str] = {
    "echo": "worker.backends.echo:EchoBackend",
}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    """The backend class for `name`; KeyError names the known backends."""
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise KeyError(
            f"unknown backend {name!r}; known backends: {', '.join(backend_names())}"
        ) from None
    module_name, class_name = target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


def create_backend(name: str, model: str, options: Mapping[str, str]) -> Backend:
    """Build (not load) a backend; raises KeyError or BackendOptionError with a readable message."""
    return backend_class(name).from_options(model, options)


__all__ = ["Backend", "BackendOptionError", "backend_class", "backend_names", "create_backend"]
