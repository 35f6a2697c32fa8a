"""Models: what a trial's model names, where its files are, the family table.

A model is a Hugging Face id `org/name` or a local model folder (absolute, or ./ or ../ from
the experiment config). A hub model is used from `<model_dir>/org__name` if that folder exists,
else in place from the Hugging Face cache, else downloaded into `<model_dir>/org__name`; its
key `org__name` (a local folder's: `local__<folder name>`) names its resources profile.
The family table maps an id to torchtune's built-in config for it and to the files inside the
folder that the config must point at, so a researcher names a model and gets a runnable config.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from cruijff.errors import CruijffError, did_you_mean
from cruijff.fileio import load_json
from cruijff.prompt_format import TRAINING_FORMATS
from cruijff.settings import CruijffSettings

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
PACKAGE_CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Family:
    """How to fine-tune and evaluate one family of models."""

    pattern: str
    lora: tuple[str, str]
    """(torchtune recipe, config): a built-in config name, or a file in cruijff/configs/."""
    files: dict[str, str]
    """Config keys that point into the model folder -> path relative to it."""
    tokenizer: str
    """The torchtune tokenizer builder the family's config uses: with eval_model_args, the
    train/eval prompt-format pair its parity test proves (cruijff/prompt_format.py)."""
    eval_model_args: dict[str, Any] = field(default_factory=dict)
    eval_generate: dict[str, Any] = field(default_factory=dict)
    tune_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted keys set on the family's built-in config: a tiny model's dimensions, CPU."""


LLAMA2_TOKENIZER = "torchtune.models.llama2.llama2_tokenizer"
LLAMA3_TOKENIZER = "torchtune.models.llama3.llama3_tokenizer"
QWEN25_TOKENIZER = "torchtune.models.qwen2_5.qwen2_5_tokenizer"
_LLAMA3_FILES = {"tokenizer.path": "original/tokenizer.model"}
_QWEN_FILES = {"tokenizer.path": "vocab.json", "tokenizer.merges_file": "merges.txt"}
_CPU_TUNE = {"device": "cpu", "dtype": "fp32"}
_CPU_EVAL = {"device": "cpu", "dtype": "float32"}


def _tiny_shape(component: str, **dims: Any) -> dict[str, Any]:
    """A family's generic LoRA builder with the tiny model's sizes (cruijff/tiny_families.py)."""
    return {"model._component_": component, "model.num_layers": 2, "model.num_heads": 4,
            "model.num_kv_heads": 2, "model.embed_dim": 64, "model.intermediate_dim": 128,
            "model.tie_word_embeddings": True, **{f"model.{k}": v for k, v in dims.items()},
            **_CPU_TUNE, **REPLICABLE}


REPLICABLE = {"seed": 0, "save_adapter_weights_only": False}
"""Set on every torchtune built-in config: theirs have `seed: null` (two runs of one config
train differently), and the Qwen2.5 ones lack the adapter-only switch a design may set."""


def _hub(pattern: str, config: str, files: dict[str, str], tokenizer: str,
         recipe: str = "lora_finetune_single_device") -> Family:
    return Family(pattern, (recipe, config), files, tokenizer,
                  eval_model_args=dict(TRAINING_FORMATS[tokenizer]), tune_overrides=REPLICABLE)

FAMILIES: tuple[Family, ...] = (
    Family(
        r"^cruijff/tiny-llama(-random)?$",
        ("lora_finetune_single_device", "tiny_llama_lora.yaml"),
        {"tokenizer.path": "tokenizer.model"},
        LLAMA2_TOKENIZER,
        eval_model_args=_CPU_EVAL,
        eval_generate={"max_tokens": 12},
    ),
    Family(
        r"^cruijff/tiny-llama3$",
        ("lora_finetune_single_device", "llama3_2/1B_lora_single_device"),
        _LLAMA3_FILES,
        LLAMA3_TOKENIZER,
        eval_model_args={**_CPU_EVAL, **TRAINING_FORMATS[LLAMA3_TOKENIZER]},
        eval_generate={"max_tokens": 8},
        tune_overrides=_tiny_shape("torchtune.models.llama3_2.lora_llama3_2",
                                   vocab_size=128256, max_seq_len=131072, rope_base=500000,
                                   scale_factor=32),
    ),
    Family(
        r"^cruijff/tiny-qwen2\.5$",
        ("lora_finetune_single_device", "qwen2_5/0.5B_lora_single_device"),
        _QWEN_FILES,
        QWEN25_TOKENIZER,
        eval_model_args={**_CPU_EVAL, **TRAINING_FORMATS[QWEN25_TOKENIZER]},
        eval_generate={"max_tokens": 8},
        tune_overrides=_tiny_shape("torchtune.models.qwen2.lora_qwen2", vocab_size=151936,
                                   max_seq_len=32768, rope_base=1000000.0, norm_eps=1e-6),
    ),
    _hub(r"^meta-llama/Llama-3\.2-1B(-Instruct)?$", "llama3_2/1B_lora_single_device",
         _LLAMA3_FILES, LLAMA3_TOKENIZER),
    _hub(r"^meta-llama/Llama-3\.2-3B(-Instruct)?$", "llama3_2/3B_lora_single_device",
         _LLAMA3_FILES, LLAMA3_TOKENIZER),
    _hub(r"^meta-llama/(Meta-)?Llama-3\.1-8B(-Instruct)?$", "llama3_1/8B_lora_single_device",
         _LLAMA3_FILES, LLAMA3_TOKENIZER),
    _hub(r"^meta-llama/(Meta-)?Llama-3\.\d-70B(-Instruct)?$", "llama3_3/70B_lora",
         _LLAMA3_FILES, LLAMA3_TOKENIZER, recipe="lora_finetune_distributed"),
    *(
        _hub(rf"^Qwen/Qwen2\.5-{re.escape(size)}B(-Instruct)?$",
             f"qwen2_5/{size}B_lora_single_device", _QWEN_FILES, QWEN25_TOKENIZER)
        for size in ("0.5", "1.5", "3", "7")
    ),
)


LOCAL_PREFIXES = ("/", "./", "../", "~/")
"""A model that starts so is a local folder; a hub id starts with a letter or digit."""
SHA256 = re.compile(r"^[0-9a-f]{64}$")
ARCHITECTURES: dict[tuple[Any, ...], str] = {
    ("llama", 128, 4, 4, 2, 384, 64, False): "cruijff/tiny-llama",
    ("llama", 2048, 16, 32, 8, 8192, 128256, True): "meta-llama/Llama-3.2-1B",
    ("llama", 3072, 28, 24, 8, 8192, 128256, True): "meta-llama/Llama-3.2-3B",
    ("llama", 4096, 32, 32, 8, 14336, 128256, True): "meta-llama/Llama-3.1-8B",
    ("llama", 8192, 80, 64, 8, 28672, 128256, True): "meta-llama/Llama-3.3-70B",
    ("qwen2", 896, 24, 14, 2, 4864, 151936, False): "Qwen/Qwen2.5-0.5B",
    ("qwen2", 1536, 28, 12, 2, 8960, 151936, False): "Qwen/Qwen2.5-1.5B",
    ("qwen2", 2048, 36, 16, 2, 11008, 151936, False): "Qwen/Qwen2.5-3B",
    ("qwen2", 3584, 28, 28, 4, 18944, 152064, False): "Qwen/Qwen2.5-7B",
}
"""A local folder's family, by the architecture its config.json describes (model_type,
hidden size, layers, attention and KV heads, FFN size, vocabulary, Llama 3's scaled RoPE):
an id of the family whose torchtune config builds exactly that shape (the sizes are
torchtune's builders')."""


def is_local(model: str) -> bool:
    """A local model folder: an absolute path, or one starting with ./ ../ or ~/."""
    return model.startswith(LOCAL_PREFIXES)


def _is_model_id(model: object) -> TypeGuard[str]:
    return isinstance(model, str) and bool(MODEL_ID.fullmatch(model)) and ".." not in model


def validate_model_id(model_id: object) -> str:
    if not _is_model_id(model_id):
        raise CruijffError(
            f"model {model_id!r} is not a Hugging Face id of the form 'org/name' "
            "(letters, digits, _ . -)"
        )
    return model_id


def validate_model(model: object) -> str:
    """A trial's model: a hub id, or a local folder (its files are checked by the build)."""
    if isinstance(model, str) and is_local(model):
        return model
    if not _is_model_id(model):
        raise CruijffError(
            f"model {model!r} is not a Hugging Face id of the form 'org/name' (letters, "
            "digits, _ . -) nor a model folder (an absolute path, or one starting with ./ or "
            "../ relative to the experiment config)")
    return model


def absolute_model(model: str, base: Path) -> str:
    """A hub id as it is; a local folder as an absolute path (a relative one from `base`, the
    experiment config's folder), so that the trial names one folder wherever it runs."""
    return os.path.abspath(base / Path(model).expanduser()) if is_local(model) else model


def model_key(model: str) -> str:
    """'meta-llama/Llama-3.2-1B-Instruct' -> 'meta-llama__Llama-3.2-1B-Instruct'; a local
    folder '/runs/llama 1b/final' -> 'local__final'. It names the model's resources profile
    and a hub model's folder in model_dir, so it never holds a path separator or a space."""
    if is_local(model):
        return "local__" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(model).name)
    return validate_model_id(model).replace("/", "__", 1)


def family_of(model: str) -> Family | None:
    """A hub id's family, or a local folder's by its config.json (ARCHITECTURES); None when
    cruijff knows none (its fine-tune then needs finetune_config)."""
    model_id = _architecture_id(Path(model)) if is_local(model) else model
    for family in FAMILIES:
        if model_id is not None and re.match(family.pattern, model_id):
            return family
    return None


_LLAMA_SIZES = (("3.2", "1B"), ("3.2", "3B"), ("3.1", "8B"), ("3.1", "70B"), ("3.3", "70B"))
KNOWN_MODELS: tuple[str, ...] = (
    "cruijff/tiny-llama", "cruijff/tiny-llama-random", "cruijff/tiny-llama3",
    "cruijff/tiny-qwen2.5",
    *(f"meta-llama/Llama-{v}-{size}{kind}" for v, size in _LLAMA_SIZES
      for kind in ("", "-Instruct")),
    *(f"Qwen/Qwen2.5-{size}B{kind}" for size in ("0.5", "1.5", "3", "7")
      for kind in ("", "-Instruct")),
)
"""The hub ids a FAMILIES pattern knows, by name: what a misspelled id is compared with
(a test checks each has its family)."""


def suggest_model(model: str) -> str:
    """' (did you mean 'org/name'?)' for a hub id a typo away from one cruijff knows
    (KNOWN_MODELS; case aside), else '': a misspelled known id says so instead of "unknown
    model". Closer than errors.did_you_mean asks: another real model (a 11B for a 1B) is no
    typo of a known one."""
    if is_local(model) or family_of(model) is not None:
        return ""
    by_lower = {known.lower(): known for known in KNOWN_MODELS}
    close = difflib.get_close_matches(model.lower(), list(by_lower), n=1, cutoff=0.9)
    return did_you_mean(by_lower[close[0]], [by_lower[close[0]]]) if close else ""


def _architecture_id(folder: Path) -> str | None:
    try:
        config = load_json(folder / "config.json", "model config.json")
        rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
        return ARCHITECTURES.get((
            config.get("model_type"), config.get("hidden_size"),
            config.get("num_hidden_layers"), config.get("num_attention_heads"),
            config.get("num_key_value_heads"), config.get("intermediate_size"),
            config.get("vocab_size"), rope.get("rope_type") == "llama3"))
    except (CruijffError, AttributeError, TypeError):  # unreadable, or no config's shape
        return None


def torchtune_config_path(name: str) -> Path:
    """Where a config named in the family table lives (cruijff's own or torchtune's built-in)."""
    own = PACKAGE_CONFIGS / name
    if own.is_file():
        return own
    spec = importlib.util.find_spec("torchtune")
    if spec is None or spec.origin is None:
        raise CruijffError("torchtune is not installed: pip install torchtune")
    path = Path(spec.origin).parent.parent / "recipes" / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise CruijffError(f"torchtune has no built-in config {name!r} (looked in {path.parent})")
    return path


def model_folder(model: str, model_dir: Path) -> Path:
    """Where a trial's model is: its own folder (checked), or a hub model's (find_model);
    for a hub model not here yet, where ensure_model will put it."""
    if is_local(model):
        folder = Path(model).expanduser()
        problem = _folder_problem(folder)
        if problem:
            raise CruijffError(
                f"model folder {folder} {problem}: give a model folder in Hugging Face format "
                "(config.json and *.safetensors weights, as save_pretrained writes them), "
                "absolute or starting with ./ or ../ relative to the experiment config")
        return folder
    return find_model(model, model_dir) or model_dir / model_key(model)


def _folder_problem(folder: Path) -> str | None:
    """What keeps a folder from being a model in Hugging Face format; None if nothing."""
    if not folder.is_dir():
        return "is not a folder" if folder.exists() else "does not exist"
    if not (folder / "config.json").is_file():
        return "has no config.json"
    if not any(folder.glob("*.safetensors")):
        return "has no *.safetensors weights"
    return None


def find_model(model_id: str, model_dir: Path) -> Path | None:
    """A hub model's files where they already are: `<model_dir>/org__name` (placing it there
    wins), else its snapshot in the Hugging Face cache, used in place (never copied)."""
    placed = model_dir / model_key(validate_model_id(model_id))
    if placed.is_dir() and any(placed.iterdir()):
        return placed
    from huggingface_hub import snapshot_download

    try:  # the cache huggingface_hub uses (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)
        snapshot = Path(snapshot_download(model_id, local_files_only=True))
    except OSError:  # not cached, or cached incompletely (LocalEntryNotFoundError)
        return None
    return None if _folder_problem(snapshot) else snapshot


def ensure_model(model_id: str, model_dir: Path, settings: CruijffSettings) -> Path:
    """The model's folder (find_model); if missing, the tiny model materialized or the hub's
    files downloaded into `<model_dir>/org__name`, where the config says models live."""
    found = find_model(model_id, model_dir)
    if found is not None:
        return found
    dest = model_dir / model_key(model_id)
    from cruijff import tiny_model

    if model_id in tiny_model.TINY_MODEL_IDS:
        tiny_model.materialize(model_id, dest)
        return dest
    if settings.is_offline:
        raise CruijffError(
            f"model {model_id}{suggest_model(model_id)} is neither in {dest} nor in the "
            "Hugging Face cache and cruijff is offline: put the Hugging Face files there "
            f"(e.g. `hf download {model_id} --local-dir {dest}`)"
        )
    return _download(model_id, dest)


def _download(model_id: str, dest: Path) -> Path:
    """Download with huggingface_hub; the token comes from the environment and is never saved."""
    from huggingface_hub import snapshot_download

    partial = dest.with_name(dest.name + ".partial")
    try:
        snapshot_download(repo_id=model_id, local_dir=partial)
    except Exception as exc:  # the hub raises many types; all mean "could not download"
        raise CruijffError(
            f"could not download model {model_id}{suggest_model(model_id)}: "
            f"{(str(exc).splitlines() or [type(exc).__name__])[0]} "
            f"(or put its files in {dest})"
        ) from None
    partial.rename(dest)
    return dest


_DIGESTS: dict[str, tuple[tuple[int, int, int], str]] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, once per process while its inode, size and mtime stay (a file
    replaced by another of the same size and mtime is another inode): a model's small files,
    a trial's data."""
    stat = path.stat()
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    known = _DIGESTS.get(str(path))
    if known is not None and known[0] == signature:
        return known[1]
    with path.open("rb") as fh:
        value = hashlib.file_digest(fh, "sha256").hexdigest()
    _DIGESTS[str(path)] = (signature, value)
    return value


_FINGERPRINTS: dict[str, tuple[tuple, str]] = {}
"""Model folder -> (its signature, its fingerprint): the latest one per folder, this process."""
_FINGERPRINTS_LOCK = threading.Lock()


def _folder_signature(folder: Path) -> tuple:
    """Every entry under a folder (hidden ones too: the hub's download records count) by
    path, inode, size, mtime and link target, as rglob walks it: a changed, replaced, added
    or removed file changes it. A stat per file, where the fingerprint reads and hashes."""
    entries: list[tuple] = []
    pending = [str(folder)]
    while pending:
        try:
            scan = os.scandir(pending.pop())
        except OSError as exc:
            entries.append((exc.filename, "unreadable"))
            continue
        with scan:
            for entry in scan:
                try:
                    stat = entry.stat()  # through links: a retargeted link changes the inode
                    link = os.readlink(entry.path) if entry.is_symlink() else None
                except OSError:
                    entries.append((entry.path, "dangling"))
                    continue
                entries.append((entry.path, stat.st_ino, stat.st_size, stat.st_mtime_ns,
                                stat.st_mode, link))
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return tuple(sorted(entries, key=lambda e: e[0]))


_ONCE: ContextVar[dict[str, str] | None] = ContextVar("cruijff_fingerprints_once",
                                                      default=None)


@contextmanager
def fingerprints_once() -> Iterator[None]:
    """Within it, each model folder is walked once: for a look at an experiment (summary,
    analyze) that asks for the fingerprint once per stage of every trial and is over in a
    second. A run, during which a folder may change, walks it each time."""
    token = _ONCE.set({})
    try:
        yield
    finally:
        _ONCE.reset(token)


def model_fingerprint(folder: Path) -> str:
    """model_folder_fingerprint, computed once per process for as long as no file in the folder
    changes (a run or `summary` asks for it once per stage of every trial)."""
    once = _ONCE.get()
    if once is not None:
        if str(folder) not in once:
            once[str(folder)] = _fingerprint(folder)
        return once[str(folder)]
    return _fingerprint(folder)


def _fingerprint(folder: Path) -> str:
    signature = _folder_signature(folder)
    known = _FINGERPRINTS.get(str(folder))
    if known is not None and known[0] == signature:
        return known[1]
    fingerprint = model_folder_fingerprint(folder)
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS[str(folder)] = (signature, fingerprint)
    return fingerprint


def model_folder_fingerprint(folder: Path) -> str:
    """A hash of a model folder's files by name and content, so that one model fingerprints
    the same from model_dir, the Hugging Face cache or a copy. Hidden files (huggingface_hub's
    .cache bookkeeping, .gitattributes) say nothing about the model and are left out."""
    entries = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            content = _hub_sha256(folder, relative, path) or _local_digest(path)
            entries.append(f"{relative.as_posix()}:{content}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


HASHED_UP_TO = 256 * 2**20
"""Bytes: a larger file that did not come from the hub is known by size and mtime, so that
`summary` of a hand-copied 70B folder does not read 140 GB (a copy made without keeping
mtimes then fingerprints as another model, and its stages run again)."""


def _local_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASHED_UP_TO:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    return file_digest(path)


def _hub_sha256(folder: Path, relative: Path, path: Path) -> str | None:
    """The sha256 huggingface_hub recorded for a file it downloaded, so that gigabytes of
    weights are not read again: the name of the cache blob the file links to, or the etag
    that `snapshot_download(local_dir=...)` keeps in .cache/huggingface/download/ (while the
    file is not newer than that record). None for files the hub names by git sha1 (small ones,
    hashed here) and for files that did not come from the hub."""
    if path.is_symlink():
        blob = path.resolve()
        return blob.name if blob.parent.name == "blobs" and SHA256.fullmatch(blob.name) else None
    record = folder / ".cache" / "huggingface" / "download" / f"{relative}.metadata"
    try:
        _commit, etag, timestamp = record.read_text(encoding="utf-8").splitlines()[:3]
        current = path.stat().st_mtime - 1 <= float(timestamp)
    except (OSError, ValueError):
        return None
    return etag if current and SHA256.fullmatch(etag) else None


def checkpoint_files(model_path: Path) -> list[str]:
    files = sorted(p.name for p in model_path.glob("*.safetensors"))
    if not files:
        raise CruijffError(f"no *.safetensors weights in {model_path}")
    return files


HEADER_LIMIT = 100 * 2**20
"""Bytes: a safetensors header larger than this is no header cruijff reads."""


def parameter_count(folder: Path) -> int | None:
    """The parameters of a model folder's *.safetensors weights, summed from the files'
    headers (8 bytes of length, then a JSON of tensor shapes): no tensor is read, so a 70B
    model costs a few reads. None when there are no weights or a header cannot be read."""
    files = sorted(Path(folder).glob("*.safetensors"))
    total = 0
    try:
        for file in files:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > HEADER_LIMIT:
                    return None
                header = json.loads(handle.read(length))
            total += sum(math.prod(entry["shape"]) for name, entry in header.items()
                         if name != "__metadata__")
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError):
        return None
    return total if files else None


def lineage(model: str) -> str | None:
    """The line of models that are sizes of one design (Llama 3.x, Qwen2.5), named by the
    tokenizer their family table entries share ('llama3', 'qwen2_5'): a resource estimate
    for one size may be scaled from another's. None for a model of no known family."""
    family = family_of(model)
    return family.tokenizer.rsplit(".", 1)[-1].removesuffix("_tokenizer") if family else None

