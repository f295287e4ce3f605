"""The package's import graph has no cycle, function-level imports included: each module depends one way.
Edges are the import statements themselves (`from cherry_megatron.a import b` names module a.b when b is a
module, else a), wherever they stand in the file."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cherry_megatron"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level` dots up
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import cherry_megatron.a.b` names a.b; a name inside a module -> it
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "cherry_megatron.train" in graph and graph["cherry_megatron.train"]  # the walk found the imports
    found = cycles(graph)
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def from_imports() -> list[tuple[str, str, str]]:
    """(file:line, module, name) of every absolute `from cherry_megatron... import name` in the package, the
    tools and the benches, function-level ones included: those run only when their branch does."""
    root = PACKAGE.parent
    out = []
    for path in [*PACKAGE.rglob("*.py"), *(root / "tools").rglob("*.py"), *(root / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("cherry_megatron"):
                out += [(f"{path.relative_to(root)}:{node.lineno}", node.module, a.name) for a in node.names]
    return out


def test_every_imported_name_exists():
    """A name moved between modules breaks a function-level import only when that branch runs (a tool's
    evaluation, say); this finds it without running the branch."""
    import importlib

    found = from_imports()
    assert len(found) > 100
    missing = []
    for where, module, name in found:
        mod = importlib.import_module(module)
        if name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{where}: from {module} import {name}")
    assert not missing, "\n".join(missing)
