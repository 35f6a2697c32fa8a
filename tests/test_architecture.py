"""The layering contract, read off the source (as import-linter would): the core never imports
the orchestrators, only the CLI reaches into cruijff.flows, nothing imports the CLI, and the
core's module-level imports form no cycle. Also what the wheel installs."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

ORCHESTRATORS = ("prefect", "prefect_dask", "dask", "distributed", "dask_jobqueue",
                 "cruijff.flows", "cruijff.deployments")
PACKAGES = {"cruijff": REPO / "cruijff", "cruijff.flows": REPO / "flows",
            "cruijff.deployments": REPO / "deployments"}


def modules() -> dict[str, Path]:
    """Every module of the distribution by its installed name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """Modules `module` imports (for `from x import y`, x and x.y when that is a module).
    top_level_only: leave out imports inside functions and under `if TYPE_CHECKING:`, which
    do not run when the module is imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = modules()
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if top_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
                node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, path.name == "__init__.py")
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names
                         if f"{target}.{a.name}" in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(f"{root}.") for root in roots)


def layering_violations(found: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in found.items():
        used = imports(module, path, top_level_only=False)
        core = not _under(module, ("cruijff.flows", "cruijff.deployments", "cruijff.cli",
                                   "cruijff.__main__"))
        if core:
            problems += [f"{module} imports {u} (the core never imports an orchestrator)"
                         for u in sorted(used) if _under(u, ORCHESTRATORS)]
        if _under(module, ("cruijff.flows",)):
            problems += [f"{module} imports {u} (flows never import deployments)"
                         for u in sorted(used) if _under(u, ("cruijff.deployments",))]
        if module not in ("cruijff.__main__",):
            problems += [f"{module} imports the CLI" for u in used if u == "cruijff.cli"]
    return problems


def cycles(found: dict[str, Path]) -> list[list[str]]:
    """Cycles among the core's module-level imports (depth-first search)."""
    core = {m: p for m, p in found.items()
            if not _under(m, ("cruijff.flows", "cruijff.deployments"))}
    graph = {m: sorted(i for i in imports(m, p, top_level_only=True) if i in core and i != m)
             for m, p in core.items()}
    found_cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state[nxt] == 1:
                found_cycles.append([*path[path.index(nxt):], nxt])
            elif state[nxt] == 0:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if state[node] == 0:
            walk(node, [node])
    return found_cycles


def test_the_layers_hold():
    assert layering_violations(modules()) == []


def test_the_core_has_no_import_cycle():
    assert cycles(modules()) == []


def test_the_checks_catch_a_violating_import(tmp_path):
    """The same checks on a copy of one core module with a bad import added."""
    runner = REPO / "cruijff" / "runner.py"
    bad = tmp_path / "runner.py"
    bad.write_text(runner.read_text() + "\n\ndef _f():\n    import prefect  # noqa\n")
    assert layering_violations({"cruijff.runner": bad}) == [
        "cruijff.runner imports prefect (the core never imports an orchestrator)"]
    state = tmp_path / "state.py"
    state.write_text((REPO / "cruijff" / "state.py").read_text()
                     + "\nfrom cruijff.runner import Trial  # noqa\n")
    found = {**modules(), "cruijff.state": state}
    assert any("cruijff.state" in cycle and "cruijff.runner" in cycle for cycle in cycles(found))


@pytest.mark.slow
def test_the_wheel_installs_flows_and_deployments_under_cruijff(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("cruijff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cruijff", next(t for t in tops if t.endswith(".dist-info"))}
    assert "cruijff/flows/experiment.py" in names
    assert "cruijff/deployments/serve.py" in names
    assert "cruijff/configs/tiny_llama_lora.yaml" in names


def test_a_folder_holding_its_own_flows_package_does_not_shadow_cruijffs(tmp_path, built):
    """A Prefect project's own flows/ in the working directory (first on sys.path)."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise ImportError('the wrong flows')\n")
    result = subprocess.run([sys.executable, "-m", "cruijff", "summary", str(built)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # 1: not every stage is done (none ran)
    assert "trial" in result.stdout and "error" not in result.stderr
