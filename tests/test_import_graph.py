"""The project's import graph has no circle, and each folder imports only the jobs below it.

Every import statement of every module of the project packages counts, read with ``ast`` (nothing is imported):
module-level, function-level and ``if TYPE_CHECKING:`` ones alike. A type-only import still makes the importing module
depend on the imported one, so a lower module that needs a type of a higher one declares what it reads instead (as
``pipelines.engine.stages.PipelineView`` does for ``pipelines.engine.plan.Pipeline``). An edge goes to the module
actually imported: ``from pipelines.engine import workers`` to ``pipelines.engine.workers``, ``from
pipelines.engine.stages import Stage`` to ``pipelines.engine.stages``, ``from storage import X`` (X no submodule) to
the package ``storage`` (its ``__init__``). Imports made from strings at run time (``importlib.import_module``) are
not seen."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "flows", "structxlip", "storage", "configs", "benchmarks")


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Return ``{dotted name: file}`` of every module of ``packages`` under ``root`` (a package as its name)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _known_module(target: str, known: set[str]) -> str | None:
    """Return ``target`` or the closest package above it that is a project module (None: not a project import)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Return the project modules that module ``name`` (source ``path``) imports anywhere in its file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(_known_module(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                targets.add(submodule if submodule in known else _known_module(module, known))
    return {target for target in targets if target is not None and target != name}


def project_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """Return ``{module: the project modules it imports}`` for every module of ``packages``."""
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module, each sorted (Tarjan's algorithm,
    iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """Return a shortest import circle through the first module of ``component`` (a strongly connected component),
    as ``[a, b, ..., a]``."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & members):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    raise ValueError(f"{component} is no import circle")


def test_the_project_has_no_import_cycle():
    graph = project_graph()
    edges = sum(len(targets) for targets in graph.values())
    # Found the whole project, not next to nothing: 77 modules and 301 edges when this was written.
    assert len(graph) > 60 and edges > 200, f"only {len(graph)} modules and {edges} imports found under {ROOT}"
    assert graph["pipelines.engine.execute"] >= {"pipelines.engine.plan", "pipelines.engine.stages"}
    assert "pipelines.steps.structure" in graph["pipelines.engine.stages"]  # a function-level import
    cycles = import_cycles(graph)
    assert cycles == [], "import circles:\n" + "\n".join(" -> ".join(cycle_path(graph, c)) for c in cycles)


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": set(),
             "x": {"y"}, "y": {"x", "e"}, "lone": {"a"}}
    cycles = import_cycles(graph)
    assert cycles == [["a", "b", "c"], ["x", "y"]]
    assert [cycle_path(graph, c) for c in cycles] == [["a", "b", "c", "a"], ["x", "y", "x"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_function_level_relative_and_type_checking_imports_are_edges(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from .. import c\nfrom pkg import VALUE\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.b\n"
                                  "import pkg.a as alias\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph = project_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c", "pkg"}
    assert graph["pkg.c"] == {"pkg.a", "pkg.sub.b"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert cycle_path(graph, ["pkg.a", "pkg.c", "pkg.sub.b"]) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


# Each folder holds one job and imports only the jobs below it (a module belongs to its longest listed prefix).
FORBIDDEN = {
    "storage": ("configs", "pipelines", "structxlip", "flows", "benchmarks"),
    "configs": ("pipelines", "structxlip", "flows", "benchmarks"),
    "pipelines.steps": ("pipelines.engine", "pipelines.reporting", "structxlip.app", "flows", "benchmarks"),
    "structxlip": ("pipelines.engine", "pipelines.reporting", "structxlip.app", "flows", "benchmarks"),
    "pipelines.engine": ("pipelines.reporting", "flows", "benchmarks"),
    "pipelines.reporting": ("structxlip.app", "flows", "benchmarks"),
    "structxlip.app": ("flows", "benchmarks"),
    "flows": ("benchmarks",),
}


def _job(module: str) -> str | None:
    """The job (a key of FORBIDDEN) of ``module``: its longest listed package prefix."""
    matches = [job for job in FORBIDDEN if module == job or module.startswith(job + ".")]
    return max(matches, key=len) if matches else None


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Return ``"a -> b"`` for every import of a job above its own (see FORBIDDEN)."""
    found = []
    for module, targets in sorted(graph.items()):
        job = _job(module)
        for target in sorted(targets):
            if job and _job(target) != job and any(_is_under(target, above) for above in FORBIDDEN[job]):
                found.append(f"{module} -> {target}")
    return found


def test_each_job_imports_only_the_jobs_below_it():
    graph = project_graph()
    # The folders exist and hold their modules: stage libraries, engine, reporting, training library and application.
    assert {"pipelines.steps.regions", "pipelines.engine.plan", "pipelines.reporting.report", "structxlip.losses",
            "structxlip.app.train"} <= set(graph)
    assert layering_violations(graph) == []
    assert layering_violations({"structxlip.losses": {"structxlip.app.train"}, "storage.layout": {"storage.atomic"},
                                "pipelines.steps.regions": {"pipelines.engine.workers", "structxlip.models"}}) == \
        ["pipelines.steps.regions -> pipelines.engine.workers", "structxlip.losses -> structxlip.app.train"]
