"""The architecture, checked on the source text (parsed with `ast`, never imported).

Layers: `protos` at the bottom, `apiary` (shared code) on it, the tiers on those, `cli` over
everything; `harness` starts tiers as processes so it needs none of them. Pure modules do no
I/O. Functions stay short. Names say what they are.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("apiary", "cli", "queen", "hive", "worker")
OURS = frozenset({*PRODUCT, "protos", "harness", "tests", "bench"})

# What each top-level package may import of ours (itself included). Unlisted: anything.
ALLOWED: dict[str, frozenset[str]] = {
    "protos": frozenset({"protos"}),
    "apiary": frozenset({"protos", "apiary"}),
    "worker": frozenset({"protos", "apiary", "worker"}),
    "hive": frozenset({"protos", "apiary", "worker", "hive"}),
    "queen": frozenset({"protos", "apiary", "queen"}),
    "cli": OURS - {"tests", "bench", "harness"},
    "harness": frozenset({"protos", "apiary", "harness"}),
    "tests": OURS,
    "bench": OURS,
}

# Logic without I/O: given a Clock, driven by tests; no sockets, processes, threads or sleeping.
PURE_MODULES = (
    "apiary/leasetoken.py",
    "hive/states.py",
    "hive/policy.py",
    "queen/registry.py",
    "queen/routing/selection.py",
    "queen/routing/stats.py",
    "queen/requests/retry.py",
    "queen/requests/quotas.py",
    "queen/leases/book.py",
    "queen/requests/endings.py",
    "queen/requests/progress.py",
    "worker/completion.py",
    "queen/http/openai/params.py",
    "queen/http/openai/shapes.py",
    "queen/http/dashboard/series.py",
    "queen/http/dashboard/forms.py",
    "queen/http/dashboard/gate.py",
    "worker/slots.py",
)
IMPURE = frozenset({"asyncio", "psutil", "os", "grpc", "time", "socket", "subprocess", "threading"})
# Imports a pure module may still make, and why.
PURE_EXCEPTIONS = {
    # grpc.StatusCode is a plain enum: the retry decision is about status codes.
    ("queen/requests/retry.py", "grpc"),
    # The gRPC door's verdict is a status code; the gate passes it on.
    ("queen/http/dashboard/gate.py", "grpc"),
}

MAX_FUNCTION_LINES = 60


def sources(*packages: str) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"


def imported_modules(tree: ast.Module, package: str) -> Iterator[tuple[ast.AST, str]]:
    """(node, dotted module) for every import anywhere in the file, lazy ones included.
    Relative imports stay inside their own package."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node, package if node.level else (node.module or "")


def by_place(offender: str) -> tuple[str, int]:
    """'queen/router.py:157: ...' sorts by file, then line number."""
    path, line, _ = offender.split(":", 2)
    return path, int(line)


def top(module: str) -> str:
    return module.split(".")[0]


def test_layers_import_only_what_is_below_them() -> None:
    offenders = []
    for package, allowed in ALLOWED.items():
        for path in sources(package):
            for node, module in imported_modules(parse(path), package):
                if top(module) in OURS and top(module) not in allowed:
                    offenders.append(
                        f"{where(path, node)}: imports {module} "
                        f"({package} may import only {', '.join(sorted(allowed))})"
                    )
    assert not offenders, "layering broken:\n" + "\n".join(offenders)


def test_pure_modules_do_no_io() -> None:
    existing = [ROOT / name for name in PURE_MODULES if (ROOT / name).exists()]
    assert existing, f"none of the pure modules exists: {PURE_MODULES}"
    offenders = []
    for path in existing:
        package = path.relative_to(ROOT).parts[0]
        for node, module in imported_modules(parse(path), package):
            name = str(path.relative_to(ROOT))
            if top(module) in IMPURE and (name, top(module)) not in PURE_EXCEPTIONS:
                offenders.append(f"{where(path, node)}: imports {module}")
    assert not offenders, "pure modules doing I/O:\n" + "\n".join(offenders)


def test_functions_are_at_most_60_lines() -> None:
    """Each def measured from its `def` line to its last line (a nested def is part of its
    parent's span, and is measured on its own as well)."""
    offenders = []
    for path in sources(*PRODUCT):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{where(path, node)}: {node.name} is {length} lines")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
        sorted(offenders, key=by_place)
    )


def single_letter_aliases(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """`S = common_pb2` (a module-level single-letter name for an imported name) and
    `import x as S` / `from x import y as S`."""
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                imported.add(bound)
                if alias.asname and len(alias.asname) == 1:
                    yield node, f"{alias.name} as {alias.asname}"
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        value = node.value
        while isinstance(value, ast.Attribute):
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in imported:
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and len(target.id) == 1:
                yield node, f"{target.id} = {ast.unparse(node.value)}"


def test_no_single_letter_module_aliases_and_no_attribute_named_c() -> None:
    offenders = []
    for path in sources(*PRODUCT, "harness"):
        tree = parse(path)
        for node, text in single_letter_aliases(tree):
            offenders.append(f"{where(path, node)}: alias {text}")
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "c"]
        if uses:
            first = min(uses, key=lambda n: n.lineno)
            text = f"attribute {ast.unparse(first)} ({len(uses)} uses in the file)"
            offenders.append(f"{where(path, first)}: {text}")
    assert not offenders, "names that say nothing:\n" + "\n".join(sorted(offenders, key=by_place))
