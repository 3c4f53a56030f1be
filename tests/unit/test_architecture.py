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
    "queen/members.py",
    "queen/routing/ask.py",
    "queen/routing/router.py",
    "queen/routing/selection.py",
    "queen/stats.py",
    "queen/routing/prefix_index.py",
    "queen/requests/retry.py",
    "queen/quotas.py",
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
    # grpc.StatusCode is a plain enum: the retry decision is about status codes (and a failed
    # attempt is built from the worker's grpc error).
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


def module_files() -> dict[str, Path]:
    """Every module of ours by dotted name (a package by its own name, for its __init__)."""
    files = {}
    for path in sources(*PRODUCT, "harness"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_files(path: Path, name: str, files: dict[str, Path]) -> Iterator[str]:
    """The modules of ours `path` imports, anywhere in it (lazy and type-only ones too)."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in files)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")[: -node.level if path.name != "__init__.py" else None]
                base = base[: len(base) - node.level + 1] if path.name == "__init__.py" else base
                module = ".".join([*base, *([module] if module else [])])
            for alias in node.names:
                if f"{module}.{alias.name}" in files:
                    yield f"{module}.{alias.name}"
                elif module in files:
                    yield module


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, edges = work[-1]
            step = next((edge for edge in edges if edge not in index or edge in stack), None)
            if step is not None and step not in index:
                index[step] = low[step] = len(index)
                stack.append(step)
                work.append((step, iter(sorted(graph[step]))))
                continue
            if step is not None:
                low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = stack[stack.index(node) :]
                del stack[stack.index(node) :]
                if len(group) > 1:
                    loops.append(sorted(group))
    return loops


def test_no_two_modules_import_each_other_directly_or_in_a_loop() -> None:
    files = module_files()
    graph = {name: set(imported_files(path, name, files)) - {name} for name, path in files.items()}
    loops = import_loops(graph)
    assert not loops, "modules that import each other:\n" + "\n".join(
        " -> ".join(loop) for loop in loops
    )


def test_the_loop_finder_finds_loops() -> None:
    """The check above, on a graph with a loop of three and a pair, and a tree."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert sorted(import_loops(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert import_loops({"a": {"b"}, "b": set()}) == []


# What routing may not know of: the doors requests come through.
NOT_FOR_ROUTING = ("queen.rpc", "queen.http", "starlette", "uvicorn")


def test_routing_imports_no_rpc_or_http_code() -> None:
    offenders = []
    for path in sources("queen/routing"):
        for node, module in imported_modules(parse(path), "queen"):
            if module.startswith(NOT_FOR_ROUTING) or module.endswith("_pb2_grpc"):
                offenders.append(f"{where(path, node)}: imports {module}")
            if module == "grpc" and isinstance(node, ast.Import) and path.name != "desk.py":
                offenders.append(f"{where(path, node)}: imports grpc (only the desk's statuses)")
    assert not offenders, "routing reaching for the doors:\n" + "\n".join(offenders)


def test_http_uses_the_services_only_through_their_public_calls() -> None:
    """The HTTP side takes nothing private from the rest of the queen: no private name
    imported, and no private attribute of another object read or set."""
    offenders = []
    for path in sources("queen/http"):
        tree = parse(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("queen."):
                if not node.module.startswith("queen.http"):  # type: ignore[union-attr]
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    offenders += [f"{where(path, node)}: imports {name}" for name in private]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    if not node.attr.startswith("__"):
                        offenders.append(f"{where(path, node)}: reads {ast.unparse(node)}")
    assert not offenders, "the HTTP side reaching inside:\n" + "\n".join(offenders)


def layout_rows() -> list[tuple[str, str]]:
    """(path, text) of each row of the README's Layout table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`").split("`")[0], cells[1]))
    return rows


def test_the_readme_layout_names_every_module() -> None:
    """Each module is named in the row of the deepest folder of the Layout table holding it."""
    rows = layout_rows()
    missing = []
    for path in sources(*PRODUCT, "harness"):
        relative = str(path.relative_to(ROOT))
        if path.name == "__init__.py" and not parse(path).body[1:]:
            continue  # a package with only its docstring
        owners = [row for row in rows if relative.startswith(row[0])]
        if not owners:
            missing.append(f"{relative}: no row of the Layout table holds it")
            continue
        folder, text = max(owners, key=lambda row: len(row[0]))
        named = relative[len(folder) :]
        if f"`{named}`" not in text and f"`{path.name}`" not in text:
            missing.append(f"{relative}: not named in the row of `{folder}`")
    assert not missing, "modules the README's Layout does not name:\n" + "\n".join(missing)


# The queen's floors, lowest first: a module imports only modules of its own floor or below.
# The core (registry, members, beats, stats, quotas, served, stopping, events, history, ...)
# is at 0; `metrics` counts the desk's queues, and a lease holds a slot from the desk; the
# cluster wires routing, leases, metrics and the core together; a request is carried out with
# the cluster; the services take requests; the HTTP side calls the services; the server builds
# it all.
QUEEN_FLOORS = (
    ("queen.server", 7), ("queen.__main__", 7), ("queen.http", 6), ("queen.rpc", 5),
    ("queen.requests", 4), ("queen.cluster", 3), ("queen.leases", 2), ("queen.metrics", 2),
    ("queen.routing", 1), ("queen", 0),
)  # fmt: skip


def queen_floor(module: str) -> int:
    return next(floor for prefix, floor in QUEEN_FLOORS if module == prefix
                or module.startswith(prefix + "."))  # fmt: skip


def test_the_queen_imports_point_down_its_floors() -> None:
    files = module_files()
    offenders = []
    for name, path in files.items():
        if not name.startswith("queen."):
            continue
        for target in imported_files(path, name, files):
            if target.startswith("queen") and queen_floor(target) > queen_floor(name):
                offenders.append(
                    f"{path.relative_to(ROOT)}: imports {target} (floor {queen_floor(target)} "
                    f"over its own {queen_floor(name)})"
                )
    assert not offenders, "queen imports pointing up:\n" + "\n".join(sorted(offenders))
