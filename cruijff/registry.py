"""The one registry of stages and prompt optimizers.

Built-ins are named here by module path; other packages add theirs through an entry point
group (`cruijff.stages`, `cruijff.optimizers`) under a namespaced name `package/name`. Nothing
is imported until it is looked up, so `--help` and `summary` pay for no stage they do not use,
and a broken plugin is a warning naming it, not a failure of every command. A plugin that
claims a built-in's name is refused. Test doubles load only where the environment asks for
them (CRUIJFF_TEST_DOUBLES=1, set by the test suite) and are refused in a user's pipeline.

A leaf module: it imports nothing of cruijff's but errors, so any module may ask it.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import warnings
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from cruijff.errors import CruijffError, did_you_mean

DEFAULT_PIPELINE = ("finetune", "prompt_opt", "eval")
"""The stages a trial may run, in order, unless the experiment config's `pipeline` says."""
PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9_]*")
TEST_DOUBLES = "CRUIJFF_TEST_DOUBLES"
"""Set to 1 (the test suite does) to offer the test-double stages and models."""


class PluginWarning(UserWarning):
    """A plugin that cannot be used; the CLI prints it as one `warning:` line."""


T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind, each imported (and instantiated, if a class) on first
    lookup. Behaves as a read-only mapping: `name in r`, `r[name]`, `list(r)`."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str],
                 test_doubles: dict[str, str] | None = None) -> None:
        self.kind, self.group = kind, group
        self.builtins = builtins
        self.test_doubles = test_doubles or {}
        self._plugins: dict[str, str] | None = None
        self._loaded: dict[str, T] = {}
        self._lock = threading.Lock()

    def _test_doubles_on(self) -> bool:
        return os.environ.get(TEST_DOUBLES, "") == "1"

    def plugins(self) -> dict[str, str]:
        """Entry points of the group (name -> 'module:attr'), read once; badly named or
        clashing ones are left out with a warning."""
        if self._plugins is None:
            found: dict[str, str] = {}
            for entry in entry_points(group=self.group):
                if entry.name in self.builtins or entry.name in self.test_doubles:
                    _warn(f"{self.kind} plugin {entry.name!r} ({entry.value}) is refused: "
                          f"cruijff has a built-in {self.kind} of that name; rename the entry "
                          f"point to 'package/name'")
                elif not PLUGIN_NAME.fullmatch(entry.name):
                    _warn(f"{self.kind} plugin {entry.name!r} ({entry.value}) is refused: "
                          "plugin names are 'package/name' (lowercase letters, digits, _)")
                else:
                    found[entry.name] = entry.value
            self._plugins = found
        return self._plugins

    def _targets(self) -> dict[str, str]:
        doubles = self.test_doubles if self._test_doubles_on() else {}
        return {**self.builtins, **doubles, **self.plugins()}

    def names(self) -> list[str]:
        """Every name that can be looked up: built-ins first, in their order."""
        return list(self._targets())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._targets()

    def __getitem__(self, name: str) -> T:
        if name in self.builtins and name in self._loaded:  # no plugin or double takes its name
            return self._loaded[name]
        targets = self._targets()
        if name not in targets:
            if name in self.test_doubles:
                raise CruijffError(f"{self.kind} {name!r} is a test double of cruijff's own "
                                   f"tests, not a {self.kind} to use: choose one of "
                                   f"{', '.join(self.builtins)}")
            raise CruijffError(f"unknown {self.kind} {name!r}{did_you_mean(name, targets)}: "
                               f"one of {', '.join(targets)}")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(name, targets[name])
        return self._loaded[name]

    def _load(self, name: str, target: str) -> T:
        module_name, _, attr = target.partition(":")
        try:
            obj: Any = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # a plugin's own code: name it, whatever went wrong
            raise CruijffError(f"{self.kind} {name!r} ({target}) failed to load: "
                               f"{type(exc).__name__}: {exc}") from None
        return obj() if isinstance(obj, type) else obj

    def loadable(self) -> dict[str, T]:
        """Every name with its object; a plugin that fails to load is left out, with a
        warning naming it."""
        found = {}
        for name in self.names():
            try:
                found[name] = self[name]
            except CruijffError as exc:
                if name in self.builtins:
                    raise
                _warn(str(exc))
        return found


_warned: set[str] = set()


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, PluginWarning, stacklevel=3)


STAGES: Registry[Any] = Registry(
    "stage", "cruijff.stages",
    {"finetune": "cruijff.stages.finetune:FinetuneStage",
     "prompt_opt": "cruijff.stages.prompt_opt:PromptOptStage",
     "eval": "cruijff.stages.eval:EvalStage"},
    test_doubles={"testing_touch": "cruijff.testing.touch_stage:TouchStage",
                  "testing_shared": "cruijff.testing.touch_stage:SharedTouchStage",
                  "testing_compute": "cruijff.testing.compute_stage:ComputeStage"},
)
"""Every stage by name (cruijff.stages.Stage instances)."""

OPTIMIZERS: Registry[Any] = Registry(
    "prompt optimizer", "cruijff.optimizers",
    {"search": "cruijff.optimizers.search:GridSearch"},
)
"""Every prompt optimizer by name (cruijff.optimizers.PromptOptimizer instances)."""


def file_stem(stage: str) -> str:
    """A stage's name as it appears in file names: a plugin's 'package/name' as
    'package__name' (its config, record and logs live in the trial folder itself)."""
    return stage.replace("/", "__")
