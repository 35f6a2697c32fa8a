"""Which `_component_` values (and other dotted paths) a fine-tune config may name.

torchtune imports and calls whatever a `_component_` names, so a design value replacing a
section (`{"_component_": "os.system", "command": "..."}`) would run code at fine-tune time.
Build therefore allows only torchtune's own components, the optimizer packages torchtune's
built-in configs use, and whatever the stage's starting config file names (the user's own
`finetune_config` is theirs to trust); everything else is refused before anything is written.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from cruijff.errors import CruijffError

COMPONENT_KEY = "_component_"
PATH_KEYS = frozenset({COMPONENT_KEY, "collate_fn", "prompt_template"})
"""Keys whose string value torchtune imports and calls: `_component_` anywhere, a recipe's
`collate_fn`, a tokenizer's `prompt_template` (a mapping of tags there stays data)."""
RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")
"""An OmegaConf resolver call in a string (`${oc.create:...}`, `${oc.env:HF_TOKEN}`): torchtune
resolves it when it loads the config, building sections no check saw or reading secrets into
its logs. Built-in configs only use plain references (`${output_dir}`)."""
ALLOWED_NAMESPACES = ("torchtune", "torch.optim", "bitsandbytes.optim")
"""What torchtune's built-in recipe configs and cruijff/configs/*.yaml name: torchtune.*,
torch.optim.AdamW and bitsandbytes.optim.PagedAdamW(8bit); the whole optimizer packages, so a
treatment can compare optimizers."""
REFUSED_NAMESPACES = ("torchtune.config", "torchtune._cli")
"""torchtune's own loader and CLI: they turn further strings into imports and calls."""
DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
ALLOWED_TEXT = (f"allowed are {', '.join(f'{n}.*' for n in ALLOWED_NAMESPACES)} "
                "(defined or exported there, not just imported into them), and any other "
                "that config.yaml's finetune_config file names itself")


def _within(name: str, namespaces: tuple[str, ...]) -> bool:
    return any(name == n or name.startswith(f"{n}.") for n in namespaces)


def components(config: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every `_component_` in a config, at any depth, and of every
    other PATH_KEYS key holding a string."""
    stack: list[tuple[str, Any]] = [(path, config)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                inner = f"{where}.{key}" if where else str(key)
                if key == COMPONENT_KEY or (key in PATH_KEYS and isinstance(value, str)):
                    yield inner, value
                else:
                    stack.append((inner, value))
        elif isinstance(item, list):
            stack.extend((where, value) for value in item)


def named_components(config: Any) -> frozenset[str]:
    """The `_component_` values a trusted config file names."""
    return frozenset(v for _, v in components(config) if isinstance(v, str))


@functools.lru_cache(maxsize=256)
def _outside(name: str) -> str | None:
    """Why `name` is not an allowed component when it is spelled like one (None when it is):
    it is looked up the way torchtune does (import, then attributes), since
    `torchtune.<module>.os.system` is spelled inside torchtune but is os.system."""
    parts = name.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
        for depth in range(1, len(parts)):
            parent = obj
            try:
                obj = getattr(obj, parts[depth])
            except AttributeError:
                if not isinstance(obj, ModuleType):
                    raise
                obj = importlib.import_module(".".join(parts[:depth + 1]))
            if not _within(".".join(parts[:depth + 1]), ALLOWED_NAMESPACES):
                continue  # still above the namespace ('torch' of 'torch.optim.SGD')
            origin = obj
            while isinstance(origin, functools.partial):  # torchtune's qlora_* builders
                origin = origin.func
            if isinstance(origin, ModuleType):
                home = actual = origin.__name__
            else:
                home = getattr(origin, "__module__", None)
                actual = f"{home}.{getattr(origin, '__qualname__', parts[depth])}"
            if isinstance(home, str) and _within(home, ALLOWED_NAMESPACES):
                continue
            exported = (isinstance(parent, ModuleType) and not isinstance(origin, ModuleType)
                        and parts[depth] in getattr(parent, "__all__", ()))
            if not exported:  # a deliberate re-export (torchao's QAT quantizers) may stay
                return (f"goes through {actual}, defined outside "
                        f"{', '.join(ALLOWED_NAMESPACES)}")
    except Exception as exc:  # whatever stops this import stops torchtune's too
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"cannot be imported here ({type(exc).__name__}{': ' if first else ''}{first})"
    return None


def check_components(config: dict[str, Any], namespace: str,
                     trusted: frozenset[str] = frozenset()) -> None:
    """Refuse a `_component_` in the final stage config that is neither in `trusted` (named by
    the starting config file) nor a component defined in an allowed namespace."""
    for key, value in components(config, namespace):
        if isinstance(value, str) and value in trusted:
            continue
        shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:80]}..."
        if (not isinstance(value, str) or not DOTTED_NAME.fullmatch(value)
                or any(part.startswith("__") for part in value.split("."))
                or not _within(value, ALLOWED_NAMESPACES)
                or _within(value, REFUSED_NAMESPACES)):
            reason = "cruijff does not let a config instantiate"
        else:
            reason = _outside(value)
        if reason is not None:
            raise CruijffError(f"key '{key}' names {shown}, which {reason}: {ALLOWED_TEXT}")
