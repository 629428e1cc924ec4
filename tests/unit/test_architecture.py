"""The dependency rule of docs/DESIGN.md ("Layout"), kept by CI: every import of our own code, module-level or
inside a function, must point down the layers, and no two files may import each other (directly or in a
longer loop).

    service.cli, service.commands   composition root: may import anything below
    service.api                     HTTP: routers, schemas, auth, serving  -> domain, engine
    workers (tasks, steps)          Celery glue                            -> domain, engine
    service.domain                  db, repositories, job states, audit    -> engine vocabulary only
    workers.engine                  the ML library                         -> nothing of ours
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "workers", "benchmarks")

# torch-free engine modules that name things the domain validates (methods, layer kinds, thresholds, corpus
# rows), and the stdlib durable-write helpers (files)
ENGINE_VOCABULARY = ("workers.engine.config", "workers.engine.verify.verdict", "workers.engine.data",
                     "workers.engine.files")

# layer -> what it may import, checked in order (most specific prefix first)
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("workers.engine", ("workers.engine",)),
    ("service.domain", ("service.domain",) + ENGINE_VOCABULARY),
    ("service.api", ("service.api", "service.domain", "workers.engine")),
    ("service.cli", ("service", "workers", "benchmarks")),
    ("service.commands", ("service.domain", "workers.engine")),
    ("service", ("service",)),  # service/__main__.py -> service.cli
    ("workers", ("workers", "service.domain")),
    ("benchmarks", ("benchmarks", "service.domain", "service.api", "workers.engine")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def own_imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, anywhere in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # `from pkg import name` may name a function, not a module: keep only targets that are files
        graph[name] = {target for target in own_imports(path) if target in modules and target != name}
    return graph


def rule_for(module: str) -> tuple[str, tuple[str, ...]]:
    for layer, allowed in RULES:
        if module == layer or module.startswith(layer + "."):
            return layer, allowed
    raise AssertionError(f"{module} belongs to no layer: add it to RULES")


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        layer, allowed = rule_for(module)
        for target in sorted(targets):
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                problems.append(f"{module} -> {target} (layer {layer} may import only {', '.join(allowed)})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), package __init__ re-exports excluded."""
    edges = {m: {t for t in ts if graph.get(t) is not None and not _is_parent(t, m)} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _is_parent(target: str, module: str) -> bool:
    """A module importing its own package's __init__ (for a sibling name) is not a file cycle."""
    return module.startswith(target + ".")


def test_imports_point_down_the_layers() -> None:
    assert back_edges(import_graph()) == []


def test_no_two_files_import_each_other() -> None:
    assert cycles(import_graph()) == []


def test_the_rule_catches_a_back_edge() -> None:
    graph = import_graph()
    graph["service.domain.job_states"] = graph["service.domain.job_states"] | {"service.api.app"}
    graph["workers.engine.store"] = graph["workers.engine.store"] | {"service.domain.settings"}
    assert back_edges(graph) == [
        "service.domain.job_states -> service.api.app (layer service.domain may import only service.domain, "
        + ", ".join(ENGINE_VOCABULARY) + ")",
        "workers.engine.store -> service.domain.settings (layer workers.engine may import only workers.engine)",
    ]


def test_the_rule_catches_a_cycle() -> None:
    graph = import_graph()
    graph["workers.engine.config"] = graph["workers.engine.config"] | {"workers.engine.store"}
    graph["workers.engine.store"] = graph["workers.engine.store"] | {"workers.engine.config"}
    assert ["workers.engine.config", "workers.engine.store"] in cycles(graph)


def test_the_api_process_stays_torch_free_unless_it_serves() -> None:
    code = (
        "import sys; import service.api.app, service.domain.settings, service.domain.submission, service.cli; "
        "heavy = sorted(m for m in ('torch', 'scipy', 'transformers', 'workers.tasks') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
