"""Task modules: `<tasks_dir>/<task>/{data.py, eval.py, eval.yaml}`.

eval.py is checked by reading its syntax tree, not by importing it: a build must not pay
Inspect's import time, and a broken eval.py should be reported, not executed. data.py is
imported only when a dataset has to be built, which is what it is for.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError
from cruijff.fileio import load_yaml_mapping

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DATA_ARGS = ("data_path", "data_ext")


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

    def build_dataset(self, dataset: str, data_dir: Path) -> Path:
        """Call data.py's build() for a missing dataset; the file must exist afterwards."""
        target = data_dir / dataset
        if target.exists():
            return target
        data_dir.mkdir(parents=True, exist_ok=True)
        build = load_function(self.folder / "data.py", f"_cruijff_task_{self.name}_data", "build")
        try:
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
    parameters, accepts_any = _parameters(fn)
    missing = [a for a in DATA_ARGS if a not in parameters and not accepts_any]
    if missing:
        raise CruijffError(
            f"task '{name}': @task {fn.name}() must accept {', '.join(DATA_ARGS)} "
            f"(missing: {', '.join(missing)})"
        )

    defaults: dict[str, Any] = {}
    if (folder / "eval.yaml").exists():
        defaults = load_yaml_mapping(folder / "eval.yaml", f"task '{name}' eval.yaml")
    module = TaskModule(name, folder, fn.name, parameters, accepts_any, defaults)
    unknown = [k for k in defaults if not module.has_parameter(str(k))]
    if unknown:
        raise CruijffError(
            f"task '{name}': eval.yaml sets {unknown[0]!r}, which @task {fn.name}() does not take"
        )
    return module


def load_function(path: Path, module_name: str, attr: str) -> Any:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CruijffError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
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
