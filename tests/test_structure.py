"""The project's import graph: no circle, also through imports inside functions (a lazy import is
still a dependency), and the shared run code sits below the algorithm (it never imports the
objectives or the policy: the scripts pass what it needs, e.g. the objective's knobs)."""

import ast
import os

from conftest import ROOT

SHARED_RUN_CODE = ("run_config", "prompt_data", "distributed", "checkpoints", "run_logs", "evaluation",
                   "run_lifecycle", "run_folder")


def project_imports() -> dict[str, set[str]]:
    """{module: project modules it imports anywhere in its source} for the top-level modules and
    data_process/ (tests, benchmarks and docs are leaves)."""
    paths = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    paths |= {f"data_process.{name[:-3]}": os.path.join(ROOT, "data_process", name)
              for name in os.listdir(os.path.join(ROOT, "data_process")) if name.endswith(".py")}
    graph = {}
    for module, path in paths.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        graph[module] = {name for name in names if name in paths and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                return path[path.index(dependency):] + [dependency]
            if dependency not in state and (cycle := visit(dependency)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_find_cycle_finds_a_circle_through_any_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_and_the_shared_run_code_does_not_know_the_algorithm():
    graph = project_imports()
    assert {"train_online_dpo", "policy", "objectives", "run_lifecycle"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    for module in SHARED_RUN_CODE:
        assert not graph[module] & {"objectives", "policy", "group_losses"}, module


def test_library_code_never_climbs_into_the_scripts_folder():
    # data_process/ holds scripts; the modules they and the trainers share (records, pairs_format) sit
    # at the top level, so that no top-level module imports a script's folder
    graph = project_imports()
    assert {"records", "pairs_format"} <= set(graph)
    climbing = {module: sorted(name for name in imports if name.startswith("data_process."))
                for module, imports in graph.items() if "." not in module}
    assert not any(climbing.values()), {k: v for k, v in climbing.items() if v}
    assert not os.path.exists(os.path.join(ROOT, "trainer_utils.py"))  # the re-export shim is gone
