"""The layout's rules, checked on the source: no import cycles among the project's own modules,
the objective imports nothing from auxiliary/, and one factory knows every user and judge kind."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"tests", "bench", "docs", "scripts", "configs", "data", "site", "__pycache__"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS for p in parts[:-1]):
            continue
        name = ".".join(parts)[:-3]
        modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports (at any depth of the file: lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert "sdpo_objective" in graph and "auxiliary.feedback.factory" in graph  # the walk sees the tree
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_objective_stands_on_the_ground_floor():
    graph = import_graph()
    for name in ("sdpo_objective", "sdpo_fused_head"):
        if name in graph:
            assert not any(t.startswith("auxiliary") for t in graph[name]), (name, graph[name])


def test_only_the_factory_imports_the_claude_and_vllm_components():
    graph = import_graph()
    optional = {"auxiliary.feedback.claude_user_simulator", "auxiliary.feedback.claude_style_judge",
                "auxiliary.feedback.vllm_user_simulator", "auxiliary.feedback.vllm_style_judge"}
    importers = {name for name, targets in graph.items() if targets & optional}
    assert importers == {"auxiliary.feedback.factory"}, importers


def test_no_module_edits_sys_path():
    for name, path in project_modules().items():
        assert "sys.path.insert" not in path.read_text(encoding="utf-8"), name
