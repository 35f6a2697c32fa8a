"""Task modules: `<tasks_dir>/<task>/{data.py, eval.py, eval.yaml}`.

eval.py is checked by reading its syntax tree, not by importing it: a build must not pay
Inspect's import time, and a broken eval.py should be reported, not executed. data.py is
imported only when a dataset has to be built, which is what it is for. What both import is
found statically too (check_imports, check_requirements): a missing dependency is a build
error, not a failure of every eval after every fine-tune has run. A task's own modules and
packages beside eval.py import as under `inspect eval` (task_imports).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError
from cruijff.fileio import load_yaml_mapping

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DATA_ARGS = ("data_path", "data_ext")
"""What cruijff passes a @task that takes them: the trial's data file, its extension."""


def validate_name(value: object, what: str) -> str:
    """A task or dataset name: one path component, no traversal, nothing hidden."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise CruijffError(
            f"{what} {value!r} must be a plain file name (letters, digits, _ . -), not a path"
        )
    return value


@dataclass(frozen=True)
class TaskModule:
    name: str
    folder: Path
    function: str
    """Name of the Inspect @task function in eval.py."""
    parameters: dict[str, Any]
    """Parameter name -> default (or REQUIRED) of the @task function."""
    accepts_any: bool
    """The @task function takes **kwargs."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """eval.yaml: default arguments of the @task function."""

    @property
    def eval_file(self) -> Path:
        return self.folder / "eval.py"

    def has_parameter(self, name: str) -> bool:
        return self.accepts_any or name in self.parameters

    @property
    def required(self) -> list[str]:
        """Parameters without a default: a call that does not give each one fails."""
        return [name for name, default in self.parameters.items() if default is REQUIRED]

    def build_dataset(self, dataset: str, data_dir: Path) -> Path:
        """Call data.py's build() for a missing dataset; the file must exist afterwards."""
        target = data_dir / dataset
        if target.exists():
            return target
        data_dir.mkdir(parents=True, exist_ok=True)
        build = load_function(self.folder / "data.py", f"_cruijff_task_{self.name}_data", "build")
        try:
            with task_imports(self.folder):
                build(dataset, str(data_dir))
        except SystemExit as exc:  # user code must not end cruijff, silently or not
            _remove_partial(target)
            raise CruijffError(
                f"task '{self.name}': build({dataset!r}, ...) called sys.exit({exc.code!r}): "
                "build() must write the dataset and return (raise an exception to fail)"
            ) from None
        except Exception as exc:  # user code: any failure is reported, with its type
            _remove_partial(target)
            raise CruijffError(
                f"task '{self.name}': build({dataset!r}, ...) failed: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        if not target.is_file():
            raise CruijffError(
                f"task '{self.name}': build({dataset!r}, ...) did not write {target}"
            )
        return target


def _remove_partial(target: Path) -> None:
    """A dataset file a failed build() left (it did not exist before): half-written, so a
    later build must not take it as the dataset."""
    if target.is_file() and not target.is_symlink():
        target.unlink(missing_ok=True)


REQUIRED = object()


def _parse(path: Path, task: str) -> ast.Module:
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CruijffError(f"task '{task}': {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CruijffError(f"task '{task}': cannot read {path}: {exc}") from None
    try:
        return ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise CruijffError(f"task '{task}': {path} line {exc.lineno}: {exc.msg}") from None
    except (MemoryError, RecursionError) as exc:  # the parser gives up on deep nesting
        raise CruijffError(
            f"task '{task}': {path.name} is nested too deeply to read ({path}: "
            f"{type(exc).__name__}): split its deepest expression into smaller ones"
        ) from None


def _is_task_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "task") or (
        isinstance(target, ast.Attribute) and target.attr == "task"
    )


def _parameters(fn: ast.FunctionDef) -> tuple[dict[str, Any], bool]:
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults: list[Any] = [REQUIRED] * (len(positional) - len(args.defaults)) + [
        _literal(d) for d in args.defaults
    ]
    params = {a.arg: d for a, d in zip(positional, defaults, strict=True)}
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params[a.arg] = REQUIRED if d is None else _literal(d)
    return params, args.kwarg is not None


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None  # a default we cannot read statically: any value type is accepted


def load_task(tasks_dir: Path, name: str) -> TaskModule:
    """Find and check a task module; every problem is a CruijffError naming the file."""
    validate_name(name, "task")
    folder = tasks_dir / name
    if not folder.is_dir():
        known = sorted(p.name for p in tasks_dir.iterdir() if p.is_dir()) \
            if tasks_dir.is_dir() else []
        hint = f" (tasks there: {', '.join(known)})" if known else ""
        raise CruijffError(f"task '{name}' not found: no folder {folder}{hint}")

    data_tree = _parse(folder / "data.py", name)
    builds = [n for n in data_tree.body if isinstance(n, ast.FunctionDef) and n.name == "build"]
    if not builds:
        raise CruijffError(f"task '{name}': data.py must define build(dataset, data_dir)")
    params, _ = _parameters(builds[-1])
    required = [p for p, d in params.items() if d is REQUIRED]
    if (len(params) < 2 and builds[-1].args.vararg is None) or len(required) > 2:
        raise CruijffError(
            f"task '{name}': data.py build must take (dataset, data_dir), "
            f"not ({', '.join(params)})"
        )

    eval_tree = _parse(folder / "eval.py", name)
    tasks = [
        n for n in eval_tree.body
        if isinstance(n, ast.FunctionDef) and any(_is_task_decorator(d) for d in n.decorator_list)
    ]
    if len(tasks) != 1:
        found = f"found {len(tasks)}" + (f": {', '.join(t.name for t in tasks)}" if tasks else "")
        raise CruijffError(f"task '{name}': eval.py must define exactly one @task ({found})")
    fn = tasks[0]
    parameters, accepts_any = _parameters(fn)  # DATA_ARGS are passed only where taken

    defaults: dict[str, Any] = {}
    if (folder / "eval.yaml").exists():
        defaults = load_yaml_mapping(folder / "eval.yaml", f"task '{name}' eval.yaml")
    module = TaskModule(name, folder, fn.name, parameters, accepts_any, defaults)
    check_requirements(folder, name)
    check_imports(folder, name)
    unknown = [k for k in defaults if not module.has_parameter(str(k))]
    if unknown:
        raise CruijffError(
            f"task '{name}': eval.yaml sets {unknown[0]!r}, which @task {fn.name}() does not take"
        )
    return module


def load_function(path: Path, module_name: str, attr: str) -> Any:
    """`attr` of a task file, imported with its folder's own modules importable (as
    `inspect eval path/to/eval.py` does)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CruijffError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with task_imports(path.parent):
            spec.loader.exec_module(module)
    except SystemExit as exc:  # user code must not end cruijff when imported
        sys.modules.pop(module_name, None)
        raise CruijffError(f"importing {path} called sys.exit({exc.code!r}): a task file must "
                           "only define functions when imported, not exit") from None
    except Exception as exc:  # user code
        sys.modules.pop(module_name, None)
        raise CruijffError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CruijffError(f"{path} does not define {attr}()")
    return fn


def _local_names(folder: Path) -> set[str]:
    """Top-level module and package names a task folder itself provides."""
    names = set()
    for entry in folder.iterdir() if folder.is_dir() else ():
        name = entry.stem if entry.suffix == ".py" and entry.is_file() else entry.name
        if entry.is_dir() and not any(entry.glob("*.py")):
            continue
        if name.isidentifier() and not name.startswith("__"):
            names.add(name)
    return names


def _module_files(module: Any) -> list[Path]:
    file = getattr(module, "__file__", None)
    paths = [file] if file else list(getattr(module, "__path__", []) or [])
    return [Path(p).resolve() for p in paths]


_TASK_FOLDERS: set[Path] = set()
"""Task folders this process has imported from (their modules are theirs alone)."""


@contextmanager
def task_imports(folder: Path) -> Iterator[None]:
    """The task folder first on sys.path while its code imports, as under Inspect. A module
    of the same name loaded earlier from elsewhere (another task's `helpers.py`) is dropped
    from sys.modules first, so each task imports its own; modules already bound keep theirs."""
    folder = folder.resolve()
    others = [f for f in _TASK_FOLDERS if f != folder]
    _TASK_FOLDERS.add(folder)
    names = _local_names(folder)
    for key in [k for k in sys.modules if k.split(".")[0] in names]:
        files = _module_files(sys.modules[key])
        if any(f.is_relative_to(other) for f in files for other in others):
            del sys.modules[key]  # another task's: never a library's, which Inspect keeps too
    importlib.invalidate_caches()
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with suppress(ValueError):
            sys.path.remove(str(folder))


def check_requirements(folder: Path, task: str) -> None:
    """A `requirements.txt` beside the task lists its extras: each must be installed (in a
    version it allows) in cruijff's environment, which is the one every stage runs in."""
    path = folder / "requirements.txt"
    if not path.is_file():
        return
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split(" #")[0].strip()
        if not line or line.startswith(("#", "-")):
            continue  # pip options (-r, -e, --index-url) are pip's to follow
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise CruijffError(f"task '{task}': {path} line {number}: {exc}") from None
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req} (have {have})")
    if problems:
        raise CruijffError(
            f"task '{task}': {path} needs {', '.join(problems)} in cruijff's environment: "
            f"install with `{sys.executable} -m pip install -r {path}`")


DISTRIBUTIONS = {"sklearn": "scikit-learn", "yaml": "PyYAML", "PIL": "Pillow",
                 "cv2": "opencv-python", "bs4": "beautifulsoup4", "skimage": "scikit-image",
                 "Levenshtein": "python-Levenshtein", "dateutil": "python-dateutil"}
"""Import names whose distribution (what pip installs) is named differently."""

GUARDS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


class _Imports(ast.NodeVisitor):
    """Absolute imports of a file, with their lines, skipping guarded ones (inside
    `try: ... except ImportError` or `if TYPE_CHECKING:`), and the relative ones."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int]] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name, node.lineno) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.found.append((node.module, node.lineno))

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(h.type is None or any(
            isinstance(n, ast.Name) and n.id in GUARDS for n in ast.walk(h.type))
            for h in node.handlers)
        for child in node.body if not guarded else []:
            self.visit(child)
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name != "TYPE_CHECKING":
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)


def check_imports(folder: Path, task: str) -> None:
    """Every module eval.py and data.py import (and, through them, the task folder's own
    modules and packages) can be found in cruijff's environment, without importing any of
    it: an eval that cannot import is found at build, not after every fine-tune has run."""
    local = _local_names(folder)
    queue = [folder / "eval.py", folder / "data.py"]
    seen: set[Path] = set()
    missing: dict[str, str] = {}
    while queue:
        path = queue.pop(0)
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        visitor = _Imports()
        visitor.visit(_parse(path, task))
        for module, line in visitor.found:
            top = module.split(".")[0]
            if top in local:
                target = folder / top
                queue += sorted(target.rglob("*.py")) if target.is_dir() else [
                    folder / f"{top}.py"]
            elif top not in sys.stdlib_module_names and top not in missing \
                    and not _findable(top):
                missing[top] = f"{path.relative_to(folder)} line {line}"
    if missing:
        where = ", ".join(f"{m!r} ({at})" for m, at in missing.items())
        dists = " ".join(DISTRIBUTIONS.get(m, m) for m in missing)
        hint = (f"add it to {folder / 'requirements.txt'} and run `{sys.executable} -m pip "
                f"install -r {folder / 'requirements.txt'}`"
                if (folder / "requirements.txt").is_file() else
                f"install it with `{sys.executable} -m pip install {dists}` (or list the task's "
                f"extras in {folder / 'requirements.txt'}, see README)")
        raise CruijffError(
            f"task '{task}': {folder} imports {where}, not installed in cruijff's "
            f"environment: {hint}")


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
