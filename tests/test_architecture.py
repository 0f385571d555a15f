"""The layering of docs/architecture.md, read from the import statements of every module."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TOP = {"cli", "bench"}  # the product's surface: may import everything
FAMILIES = {"act", "quant", "explain", "distributed", "decompose"}
FOUNDATION = {"codecs", "kernels", "data", "models", "blocks", "argtypes", "checkpoints", "table", "fields", "loop"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (annotations only, not run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """{module: lowbit modules it imports} (imports inside functions included)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}

    def resolve(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        skip = _type_checking_nodes(tree)
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(head + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.startswith("lowbit") else None
                if r and r != m:
                    edges[m].add(r)
    return edges


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_core_module_imports_the_cli_or_the_benchmarks():
    upward = [(m, n) for m, ns in import_graph().items() for n in ns
              if _part(n) in TOP and _part(m) not in TOP and m != "lowbit"]
    assert upward == []


def test_only_the_bench_command_imports_the_benchmarks():
    # the product's commands (train, quantize, ptq, explain, ...) stand on the core alone, so a
    # benchmark can change without changing what a user's command does
    leaks = [(m, n) for m, ns in import_graph().items() for n in ns
             if m.startswith("lowbit.cli") and m != "lowbit.cli.bench" and _part(n) == "bench"]
    assert leaks == []


def test_foundation_does_not_import_the_families():
    upward = [(m, n) for m, ns in import_graph().items() for n in ns
              if _part(m) in FOUNDATION and _part(n) in FAMILIES]
    assert upward == []


def test_no_import_cycles():
    edges = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_graph_sees_real_imports():
    edges = import_graph()  # guards the checks above against a parser that finds nothing
    assert "lowbit.codecs" in edges["lowbit.act.compressor"]
    assert any(n.startswith("lowbit.bench") for n in edges["lowbit.cli.bench"])
    assert "lowbit.train" in edges["lowbit.cli.train"]  # imports inside functions are seen
