"""A tiny, offline Llama-2-style demo model in Hugging Face format.

cruijff must run end to end on a laptop CPU with no network. This module builds a
~0.8M-parameter Llama-2-architecture model locally and writes it as a Hugging Face
model directory that both torchtune (``FullModelHFCheckpointer``, ``model_type: LLAMA2``,
``llama2_tokenizer``) and transformers / Inspect's ``hf/`` provider load.

Two models:

- ``cruijff/tiny-llama-random``: random initialization (fast, for tests).
- ``cruijff/tiny-llama``: a tiny *pretrained* base. It is fully trained for a few epochs on
  "Repeat: <word>" -> "<word>", with about half of the words in UPPER case, so that both
  alphabets already play the input and the output role. A LoRA on this base then learns
  capitalization ("Capitalize: hello" -> "HELLO"); LoRA on a random base, or on a base
  pretrained on lowercasing, learns nothing (measured, see DESIGN.md).

Tokenizer: SentencePiece ``model_type=char``, one token per character, trained in memory.
Exactly 64 pieces: ``<unk>`` (0, also torchtune's pad id), ``<s>`` (1), ``</s>`` (2), then
``▁`` (the space), ``a``-``z``, ``A``-``Z`` and the punctuation ``:.,;?!'-``. Normalization is
``identity`` with ``remove_extra_whitespaces=False`` so that SentencePiece (torchtune) and
the converted ``tokenizer.json`` (transformers) split every string the same way.

Prompt tokens: torchtune's ``instruct_dataset`` with ``Llama2Tokenizer(prompt_template=None)``
encodes a record ``{input, output}`` as ``<s> ▁ input output </s>``: the user turn gets
SentencePiece's dummy-prefix space, the assistant turn continues the same turn and gets
*no* space (torchtune trims it, because this vocabulary encodes whitespace). The
``chat_template`` written to ``tokenizer_config.json`` renders exactly that, and the HF
tokenizer adds no BOS/EOS by itself, so ``apply_chat_template(..., tokenize=True)`` and
Inspect's ``tokenizer(apply_chat_template(..., tokenize=False))`` both give torchtune's
prompt ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import string
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cruijff.fileio import umask
from cruijff.tiny_families import BUILDERS as FAMILY_BUILDERS

TINY_MODEL_IDS: frozenset[str] = frozenset(
    {"cruijff/tiny-llama", "cruijff/tiny-llama-random", *FAMILY_BUILDERS}
)

# --- architecture (torchtune llama2 builder arguments) --------------------------------
VOCAB_SIZE = 64
EMBED_DIM = 128
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_DIM = 384
MAX_SEQ_LEN = 128
NORM_EPS = 1e-5
ROPE_BASE = 10000.0

# --- tokenizer ------------------------------------------------------------------------
PUNCTUATION = ":.,;?!'-"
# Order of the pieces after the three control pieces; " " becomes "▁".
ALPHABET = " " + string.ascii_lowercase + string.ascii_uppercase + PUNCTUATION
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Renders what torchtune's tokenize_messages_no_special_tokens produces for
# Llama2Tokenizer(prompt_template=None) with this vocabulary: BOS at the start of each turn
# (a turn ends with an assistant message, which gets EOS), contents right-stripped of
# spaces, and a leading space (SentencePiece's dummy prefix) only on a turn's first message
# or after a message that ended with a space. The generation prompt adds nothing.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(start=true, space=false) -%}"
    "{%- for message in messages -%}"
    "{%- if ns.start -%}{{ bos_token }}{%- endif -%}"
    "{%- if ns.start or ns.space -%}{{ ' ' }}{%- endif -%}"
    "{{ message['content'].rstrip(' ') }}"
    "{%- set ns.space = message['content'].endswith(' ') -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ eos_token }}{%- set ns.start = true -%}{%- set ns.space = false -%}"
    "{%- else -%}{%- set ns.start = false -%}{%- endif -%}"
    "{%- endfor -%}"
)

# --- pretraining ("Repeat" task) for cruijff/tiny-llama ---------------------------------
REPEAT_PROMPT = "Repeat: {word}"
PRETRAIN_WORDS = 2000
PRETRAIN_EPOCHS = 3
PRETRAIN_BATCH_SIZE = 16
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP_STEPS = 20
PRETRAIN_SEED = 0
MAX_THREADS = 4

GENERATION_MAX_NEW_TOKENS = 32


def materialize(model_id: str, dest: Path) -> None:
    """Write the model into dest (HF format). Atomic: build in a temp dir beside dest, then rename.

    Idempotent: if ``dest`` already exists and is not empty it is taken as complete (only a
    finished build is ever renamed into place) and left alone; an empty ``dest`` directory
    is replaced. Deterministic (bit-identical files) for a given torch build and thread count.
    """
    if model_id not in TINY_MODEL_IDS:
        raise ValueError(
            f"unknown tiny model {model_id!r}; expected one of {sorted(TINY_MODEL_IDS)}"
        )
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _build(model_id, tmp)
        _apply_umask(tmp)
        try:
            os.rename(tmp, dest)  # POSIX: also replaces an empty directory
        except OSError:
            # Another process finished first; its copy is equivalent.
            if not (dest.is_dir() and any(dest.iterdir())):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# building blocks


def _build(model_id: str, out: Path) -> None:
    import torch

    if model_id in FAMILY_BUILDERS:
        with _torch_threads(min(torch.get_num_threads(), MAX_THREADS)):
            FAMILY_BUILDERS[model_id](out)
        return
    _write_sentencepiece(out / "tokenizer.model")
    with _torch_threads(min(torch.get_num_threads(), MAX_THREADS)):
        model = _new_model()
        if model_id == "cruijff/tiny-llama":
            _pretrain(model, out / "tokenizer.model")
    _write_weights(model, out / "model.safetensors")
    _write_configs(out)


def _write_sentencepiece(path: Path) -> None:
    import sentencepiece as spm

    # Distinct frequencies fix the piece order (SentencePiece sorts by frequency).
    lines = [ch * (2000 - 10 * i) for i, ch in enumerate(ALPHABET)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="char",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        byte_fallback=False,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    expected = ["<unk>", "<s>", "</s>"] + [("▁" if c == " " else c) for c in ALPHABET]
    if pieces != expected:  # pragma: no cover - guards a sentencepiece behaviour change
        raise RuntimeError(f"unexpected tiny tokenizer pieces: {pieces}")


def _new_model(seed: int = 0) -> Any:
    import torch
    from torchtune.models.llama2 import llama2

    torch.manual_seed(seed)
    return llama2(
        vocab_size=VOCAB_SIZE,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        embed_dim=EMBED_DIM,
        max_seq_len=MAX_SEQ_LEN,
        intermediate_dim=INTERMEDIATE_DIM,
        norm_eps=NORM_EPS,
        rope_base=ROPE_BASE,
    )


def _random_words(n: int, rng: random.Random, lengths: Sequence[int] = (4, 5, 6)) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice(lengths)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _repeat_records(n: int = PRETRAIN_WORDS, seed: int = PRETRAIN_SEED) -> list[dict[str, str]]:
    """The pretraining set: about half of the words upper case; the output repeats the input."""
    rng = random.Random(f"cruijff-tiny-llama-repeat-{seed}")
    records = []
    for w in _random_words(n, rng):
        if rng.random() < 0.5:
            w = w.upper()
        records.append({"input": REPEAT_PROMPT.format(word=w), "output": w})
    return records


def _sft_transform(tokenizer_path: Path) -> Any:
    """torchtune's own per-sample transform of instruct_dataset (train_on_input=False)."""
    from torchtune.data import InputOutputToMessages
    from torchtune.datasets._sft import SFTTransform
    from torchtune.models.llama2 import llama2_tokenizer

    tokenizer = llama2_tokenizer(str(tokenizer_path), max_seq_len=MAX_SEQ_LEN, prompt_template=None)
    return SFTTransform(
        message_transform=InputOutputToMessages(
            train_on_input=False, column_map={"input": "input", "output": "output"}
        ),
        model_transform=tokenizer,
    )


def _pretrain(model: Any, tokenizer_path: Path) -> None:
    """Full training on the Repeat task, the way torchtune's full-finetune recipe trains."""
    import torch
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
    from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

    transform = _sft_transform(tokenizer_path)
    samples = [transform(dict(r)) for r in _repeat_records()]
    steps_per_epoch = (len(samples) + PRETRAIN_BATCH_SIZE - 1) // PRETRAIN_BATCH_SIZE
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=PRETRAIN_WARMUP_STEPS,
        num_training_steps=PRETRAIN_EPOCHS * steps_per_epoch,
    )
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=CROSS_ENTROPY_IGNORE_IDX)
    gen = torch.Generator().manual_seed(PRETRAIN_SEED)
    model.train()
    for _ in range(PRETRAIN_EPOCHS):
        order = torch.randperm(len(samples), generator=gen).tolist()
        for start in range(0, len(order), PRETRAIN_BATCH_SIZE):
            batch = padded_collate_sft(
                [samples[i] for i in order[start : start + PRETRAIN_BATCH_SIZE]],
                padding_idx=0,
                ignore_idx=CROSS_ENTROPY_IGNORE_IDX,
            )
            tokens, labels = batch["tokens"], batch["labels"]
            # as in the torchtune recipes: position t predicts token t+1
            labels = torch.cat(
                [labels[:, 1:], torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)], dim=1
            )
            logits = model(tokens)
            loss = loss_fn(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            scheduler.step()
    model.eval()


def _write_weights(model: Any, path: Path) -> None:
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    hf = tune_to_hf(
        model.state_dict(), num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, dim=EMBED_DIM
    )
    save_file(
        {k: v.detach().contiguous().clone() for k, v in hf.items()},
        str(path),
        metadata={"format": "pt"},
    )


def _hf_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": EMBED_DIM,
        "intermediate_size": INTERMEDIATE_DIM,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": EMBED_DIM // NUM_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_SEQ_LEN,
        "rms_norm_eps": NORM_EPS,
        "rope_theta": ROPE_BASE,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _write_configs(out: Path) -> None:
    (out / "config.json").write_text(json.dumps(_hf_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": BOS_ID,
                "eos_token_id": EOS_ID,
                "pad_token_id": EOS_ID,
                "max_new_tokens": GENERATION_MAX_NEW_TOKENS,
            },
            indent=2,
        )
        + "\n"
    )
    _write_hf_tokenizer(out)


def _write_hf_tokenizer(out: Path) -> None:
    """Convert tokenizer.model to tokenizer.json once, with the chat template, and save it."""
    from transformers import AutoTokenizer

    conv = out / ".tokenizer-conversion"
    conv.mkdir()
    shutil.copy(out / "tokenizer.model", conv / "tokenizer.model")
    (conv / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": False,
                "add_eos_token": False,
                "legacy": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    tok = AutoTokenizer.from_pretrained(str(conv))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    shutil.rmtree(conv)
    # Keep the template inside tokenizer_config.json too (older readers look only there).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _apply_umask(root: Path) -> None:
    """mkdtemp makes a 0700 directory (and safetensors writes 0600 files): use the umask."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
