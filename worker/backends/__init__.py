"""The catalog of inference backends; each is imported only when asked for."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field

from worker.backends.base import (
    Backend,
    BackendOptionError,
    GenerationRequest,
    Message,
    Piece,
    Progress,
    Rendered,
    RequestRefused,
)

# name -> "module:Class". Imported lazily so a hive can list backends without
# importing heavy engines.
_BACKENDS: dict[str, str] = {
    "echo": "worker.backends.echo:EchoBackend",
    "llamacpp": "worker.backends.llamacpp:LlamaCppBackend",
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


@dataclass(frozen=True)
class BackendDescription:
    name: str
    available: bool
    unavailable_reason: str = ""
    version: str = ""
    devices: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    for_testing: bool = False


def describe_backend(name: str) -> BackendDescription:
    """What the catalog says of one backend on this machine; KeyError names the known ones."""
    cls = backend_class(name)
    missing = [m for m in cls.REQUIRES if importlib.util.find_spec(m) is None]
    if missing:
        install = f"pip install 'apiary[{cls.EXTRA}]'" if cls.EXTRA else f"install {cls.PACKAGE}"
        return BackendDescription(
            name,
            available=False,
            unavailable_reason=f"python module {', '.join(missing)} is not installed ({install})",
            options=dict(cls.OPTIONS),
            for_testing=cls.FOR_TESTING,
        )
    try:
        version = importlib.metadata.version(cls.PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return BackendDescription(
        name,
        available=True,
        version=version,
        devices=cls.devices(),
        options=dict(cls.OPTIONS),
        for_testing=cls.FOR_TESTING,
    )


def create_backend(name: str, model: str, options: Mapping[str, str], slots: int = 1) -> Backend:
    """Build (not load) a backend; raises KeyError or BackendOptionError with a readable message."""
    return backend_class(name).from_options(model, options, slots)


__all__ = [
    "Backend",
    "BackendDescription",
    "BackendOptionError",
    "GenerationRequest",
    "Message",
    "Piece",
    "Progress",
    "Rendered",
    "RequestRefused",
    "backend_class",
    "backend_names",
    "create_backend",
    "describe_backend",
]
