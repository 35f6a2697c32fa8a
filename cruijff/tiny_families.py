"""Family-shaped tiny models: Llama 3.2 and Qwen2.5 as their hubs ship them, only smaller.

A researcher's first real run is on a hub model, through code paths the demo model never
takes: torchtune's Llama 3 tiktoken tokenizer and Qwen's byte-level BPE, their special
tokens at their real ids, the checkpointer's ``LLAMA3_2``/``QWEN2`` conversions with tied
embeddings, Llama 3's scaled RoPE, Qwen's attention biases, and the chat template Inspect's
``hf/`` provider applies. These models have each hub model's folder layout, file formats,
vocabulary size and special tokens; only the layer sizes, and the number of BPE merges, are
small. They are randomly initialised: LoRA on a random base learns nothing (DESIGN.md), so
they prove that every part runs and agrees, not that a treatment helps; the learning demo
stays on ``cruijff/tiny-llama``.

The vocabulary: a byte-level BPE with a few hundred merges trained here, padded to the
family's size with entries whose bytes contain 0xFF. Valid UTF-8 never holds that byte, so
no text ever becomes a padding token, and the special tokens sit at their real ids on both
sides (HF ``tokenizer.json`` and torchtune's ``tokenizer.model``/``vocab.json``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cruijff.prompt_format import CHATML_TEMPLATE, LLAMA3_TURNS

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
MERGES = 700
"""At most this many BPE merges (the small corpus below yields ~180); the hubs' have ~128k
and ~151k."""
CORPUS = (
    "Capitalize this word: {w}", "Repeat: {W}", "Answer with one word. {W} or {w}?",
    "You are a helpful assistant.", "The quick brown fox jumps over the lazy dog, 12 times!",
    "system user assistant\n\n", "What is 7 + 35? It is 42.",
)
WORDS = ("hello", "world", "model", "cruijff", "token", "learning", "answer", "python")


@dataclass(frozen=True)
class Shape:
    """One family's tiny architecture and the hub facts it keeps."""

    vocab_size: int
    base_vocab: int
    """Ids below this are BPE tokens; the special tokens start here (as on the hub)."""
    special: dict[str, int]
    pattern: str
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    dim: int = 64
    ffn: int = 128
    max_seq_len: int = 131072


def _llama3_special() -> dict[str, int]:
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>"]
    tokens = {name: 128000 + i for i, name in enumerate(named)}
    return tokens | {f"<|reserved_special_token_{i - 128009}|>": i for i in range(128011, 128256)}


QWEN_SPECIAL = dict(zip(
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
     "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
     "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
     "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"], range(151643, 151665), strict=True))

LLAMA3 = Shape(vocab_size=128256, base_vocab=128000, special=_llama3_special(),
               pattern=LLAMA3_PATTERN)
QWEN25 = Shape(vocab_size=151936, base_vocab=151643, special=QWEN_SPECIAL, pattern=QWEN_PATTERN,
               max_seq_len=32768)

# The hubs' own chat templates, in behaviour: Llama 3.2 Instruct always opens with a system
# turn carrying dates; Qwen2.5 Instruct adds its default system prompt when a chat has none.
# Their turns are torchtune's format (cruijff/prompt_format.py), which the eval uses alone.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
) + LLAMA3_TURNS
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
) + CHATML_TEMPLATE


# --------------------------------------------------------------------------------------
# byte-level BPE shared by both families


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE files are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _trained_bpe(shape: Shape, *, ignore_merges: bool) -> tuple[Any, dict[str, int], list[str]]:
    """A BPE trained on CORPUS, padded to shape.base_vocab: (tokenizer, vocab, merges)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(shape.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    lines = [line.format(w=w, W=w.upper()) for line in CORPUS for w in WORDS]
    bpe.train_from_iterator(lines * 4, trainers.BpeTrainer(
        vocab_size=256 + MERGES, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[]))
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    chars = _byte_chars()
    for index in range(len(vocab), shape.base_vocab):
        vocab["".join(chars[b] for b in b"\xff" + index.to_bytes(3, "big"))] = index
    return bpe, vocab, merges


def _tokenizer_json(shape: Shape, vocab: dict[str, int], merges: list[str], *,
                    ignore_merges: bool, bos: str | None, nfc: bool) -> dict[str, Any]:
    """tokenizer.json in the hub's shape: BPE model, split+byte-level pre-tokenizer, special
    tokens as added tokens at their ids, and (Llama 3) BOS added by the post-processor."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for t, i in sorted(shape.special.items(), key=lambda item: item[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    post: dict[str, Any] = byte_level
    if bos is not None:
        post = {"type": "Sequence", "processors": [byte_level, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [shape.special[bos]], "tokens": [bos]}},
        }]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": shape.pattern}, "behavior": "Isolated",
             "invert": False},
            byte_level]},
        "post_processor": post,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges},
    }


# --------------------------------------------------------------------------------------
# weights


def _save_weights(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def _llama3_weights(out: Path) -> None:
    import torch
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.models.llama3_2 import llama3_2

    s = LLAMA3
    torch.manual_seed(0)
    model = llama3_2(vocab_size=s.vocab_size, num_layers=s.layers, num_heads=s.heads,
                     num_kv_heads=s.kv_heads, embed_dim=s.dim, max_seq_len=s.max_seq_len,
                     intermediate_dim=s.ffn, rope_base=500_000, scale_factor=32,
                     tie_word_embeddings=True)
    _save_weights(tune_to_hf(model.state_dict(), num_heads=s.heads, num_kv_heads=s.kv_heads,
                             dim=s.dim), out / "model.safetensors")


def _qwen_weights(out: Path) -> None:
    import torch
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    s = QWEN25
    torch.manual_seed(0)
    model = qwen2(vocab_size=s.vocab_size, num_layers=s.layers, num_heads=s.heads,
                  num_kv_heads=s.kv_heads, embed_dim=s.dim, intermediate_dim=s.ffn,
                  max_seq_len=s.max_seq_len, rope_base=1_000_000.0, norm_eps=1e-6,
                  tie_word_embeddings=True)
    _save_weights(qwen2_tune_to_hf(model.state_dict(), num_heads=s.heads,
                                   num_kv_heads=s.kv_heads, dim=s.dim,
                                   tie_word_embeddings=True), out / "model.safetensors")


# --------------------------------------------------------------------------------------
# the two families


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_llama3(out: Path) -> None:
    """meta-llama/Llama-3.2-1B-Instruct's layout: original/tokenizer.model (tiktoken) too."""
    s = LLAMA3
    _, vocab, merges = _trained_bpe(s, ignore_merges=True)
    _write_json(out / "tokenizer.json", _tokenizer_json(
        s, vocab, merges, ignore_merges=True, bos="<|begin_of_text|>", nfc=False))
    to_byte = {c: b for b, c in _byte_chars().items()}
    ranks = sorted(vocab.items(), key=lambda item: item[1])
    (out / "original").mkdir()
    (out / "original" / "tokenizer.model").write_text("".join(
        f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}\n"
        for token, rank in ranks))
    head_dim = s.dim // s.heads
    _write_json(out / "original" / "params.json", {
        "dim": s.dim, "n_layers": s.layers, "n_heads": s.heads, "n_kv_heads": s.kv_heads,
        "vocab_size": s.vocab_size, "ffn_dim_multiplier": 1.5, "multiple_of": 256,
        "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True})
    _write_json(out / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "head_dim": head_dim, "hidden_act": "silu",
        "hidden_size": s.dim, "initializer_range": 0.02, "intermediate_size": s.ffn,
        "max_position_embeddings": s.max_seq_len, "mlp_bias": False,
        "num_attention_heads": s.heads, "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": s.vocab_size})
    _write_json(out / "generation_config.json", {
        "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6, "top_p": 0.9})
    _write_json(out / "special_tokens_map.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "chat_template": LLAMA3_CHAT_TEMPLATE})
    _llama3_weights(out)


def build_qwen25(out: Path) -> None:
    """Qwen/Qwen2.5-0.5B-Instruct's layout: vocab.json + merges.txt beside tokenizer.json."""
    s = QWEN25
    _, vocab, merges = _trained_bpe(s, ignore_merges=False)
    _write_json(out / "tokenizer.json", _tokenizer_json(
        s, vocab, merges, ignore_merges=False, bos=None, nfc=True))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                    encoding="utf-8")
    _write_json(out / "config.json", {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "hidden_act": "silu", "hidden_size": s.dim, "initializer_range": 0.02,
        "intermediate_size": s.ffn, "max_position_embeddings": s.max_seq_len,
        "max_window_layers": s.layers, "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": s.max_seq_len,
        "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
        "use_sliding_window": False, "vocab_size": s.vocab_size})
    _write_json(out / "generation_config.json", {
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
        "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
        "top_p": 0.8, "top_k": 20})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": 131072, "chat_template": QWEN_CHAT_TEMPLATE})
    _qwen_weights(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "cruijff/tiny-llama3": build_llama3,
    "cruijff/tiny-qwen2.5": build_qwen25,
}
