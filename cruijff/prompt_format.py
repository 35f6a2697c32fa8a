"""One prompt format for training and evaluation: the tokens a model learns from are the
tokens it is asked with.

torchtune formats a training record with its own tokenizer code; Inspect's ``hf/`` provider
formats an eval prompt with the model folder's chat template, then tokenizes that text with
the tokenizer's defaults. For hub models the two differ in ways no accuracy number shows:
Llama 3.2 Instruct's template adds a dated system turn that torchtune never writes, Qwen2.5's
adds a default system prompt, and Llama 3's tokenizer adds a second BOS to a template that
already starts with one. So cruijff's eval does not use the folder's template: for each
torchtune tokenizer it knows, the eval gets a template that renders exactly torchtune's
format, and tokenizes without adding special tokens (``TRAINING_FORMATS``). For anything else
(a user's own tokenizer, template or eval model_args) `check` compares the two sides on a
real training record at build, and refuses a mismatch with the first token that differs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError

FORMAT_KEYS = ("chat_template", "use_chat_template", "tokenizer_call_args")
"""Inspect hf/ model_args that decide how a prompt becomes tokens."""

# torchtune's Llama3Tokenizer: BOS, then per message a role header, the stripped content, and
# <|eot_id|>; the assistant's header opens the answer.
LLAMA3_TURNS = (
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
LLAMA3_TEMPLATE = "{{- bos_token }}" + LLAMA3_TURNS
# torchtune's Qwen2_5Tokenizer: ChatML turns, content as written, no default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NO_SPECIAL_TOKENS = {"add_special_tokens": False}

TRAINING_FORMATS: dict[str, dict[str, Any]] = {
    "torchtune.models.llama3.llama3_tokenizer": {
        "chat_template": LLAMA3_TEMPLATE, "tokenizer_call_args": NO_SPECIAL_TOKENS},
    "torchtune.models.qwen2_5.qwen2_5_tokenizer": {
        "chat_template": CHATML_TEMPLATE, "tokenizer_call_args": NO_SPECIAL_TOKENS},
}
"""torchtune tokenizer builder -> the Inspect hf/ model_args that reproduce its format."""

SYSTEM_PROMPT = "Answer in one word."
"""Parity holds with and without a system turn; this one stands in for a task's."""


def known_pair(tokenizer: dict[str, Any], model_args: dict[str, Any],
               family_tokenizer: str | None, family_args: dict[str, Any]) -> bool:
    """The tokenizer and eval model_args a model's family pairs by default (its parity is
    proven by cruijff's tests, so a build need not load anything to know it)."""
    return (family_tokenizer is not None and tokenizer.get("prompt_template") is None
            and tokenizer.get("_component_") == family_tokenizer
            and all(model_args.get(key) == family_args.get(key) for key in FORMAT_KEYS))


def training_ids(tokenizer: dict[str, Any], record: dict[str, str],
                 system: str | None) -> tuple[list[int], int]:
    """The tokens torchtune trains on for one record, as cruijff's instruct_dataset sets it up,
    and the index of the first answer token."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, InputOutputToMessages
    from torchtune.datasets._sft import SFTTransform

    model = tt_config.instantiate(OmegaConf.create(tokenizer))
    transform = SFTTransform(
        message_transform=InputOutputToMessages(train_on_input=False, new_system_prompt=system),
        model_transform=model)
    sample = transform(dict(record))
    labels = sample["labels"]
    start = next(i for i, label in enumerate(labels) if label != CROSS_ENTROPY_IGNORE_IDX)
    return list(sample["tokens"]), start


def eval_ids(model_path: Path, model_args: dict[str, Any], prompt: str,
             system: str | None) -> list[int]:
    """The tokens Inspect's hf/ provider sends for a one-turn prompt (its hf_chat, then its
    tokenizer call), with these model_args."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    messages = [*([{"role": "system", "content": system}] if system else []),
                {"role": "user", "content": prompt}]
    template = model_args.get("chat_template")
    if not isinstance(template, str):
        template = tokenizer.chat_template
    if model_args.get("use_chat_template") is False:
        template = None
    if template is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    else:
        text = tokenizer.apply_chat_template(messages, chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
    call_args = model_args.get("tokenizer_call_args") or {}
    return list(tokenizer(text, **call_args)["input_ids"])


def _said(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def mismatch(tokenizer: dict[str, Any], model_path: Path, model_args: dict[str, Any],
             record: dict[str, str]) -> str | None:
    """Where the eval's prompt departs from the fine-tune's, or None when it is the training
    sequence up to the answer (with and without a system turn)."""
    for system in (None, SYSTEM_PROMPT):
        try:
            train, start = training_ids(tokenizer, record, system)
        except Exception as exc:  # torchtune's builders raise anything on a bad file
            return f"the fine-tune's tokenizer does not load ({_said(exc)})"
        try:
            asked = eval_ids(model_path, model_args, record["input"], system)
        except Exception as exc:  # transformers and jinja likewise
            return f"the eval's tokenizer does not load ({_said(exc)})"
        turn = "with a system prompt" if system else "without a system prompt"
        if asked == train[:len(asked)] and start <= len(asked):
            continue
        at = next((i for i, (a, b) in enumerate(zip(asked, train[:start], strict=False))
                   if a != b), min(len(asked), start))
        seen = f"token {asked[at]}" if at < len(asked) else "the end of the prompt"
        trained = f"token {train[at]}" if at < start else "the answer"
        return (f"{turn}, the eval's prompt differs from the fine-tune's at token {at}: "
                f"the eval sends {seen}, the fine-tune trained on {trained}")
    return None


@functools.lru_cache(maxsize=32)
def _checked(tokenizer_json: str, model_path: Path, args_json: str,
             record_json: str) -> str | None:
    return mismatch(json.loads(tokenizer_json), model_path, json.loads(args_json),
                    json.loads(record_json))


def first_record(data_path: Path) -> dict[str, str] | None:
    """The dataset's first training record (the fine-tune checks the file's shape)."""
    try:
        records = json.loads(data_path.read_text(encoding="utf-8")).get("train") or []
    except (OSError, ValueError, AttributeError):
        return None
    record = records[0] if records and isinstance(records[0], dict) else None
    if record is None or not all(isinstance(record.get(k), str) for k in ("input", "output")):
        return None
    return {"input": record["input"], "output": record["output"]}


def check(model: str, tokenizer: dict[str, Any], model_path: Path, model_args: dict[str, Any],
          data_path: Path) -> None:
    """Refuse an experiment whose eval would prompt a fine-tuned model in another format than
    it was trained in, judged on the dataset's first training record. Needs the model's
    files: before they exist (a dry run) there is nothing to compare."""
    record = first_record(data_path)
    if record is None or not (model_path / "config.json").is_file():
        return
    problem = _checked(json.dumps(tokenizer, sort_keys=True), model_path,
                       json.dumps({k: model_args.get(k) for k in FORMAT_KEYS}, sort_keys=True),
                       json.dumps(record, sort_keys=True))
    if problem:
        raise CruijffError(
            f"model {model}: {problem}: train and evaluate in one format: leave "
            "finetune.tokenizer.prompt_template and eval.model_args.chat_template / "
            "use_chat_template / tokenizer_call_args at cruijff's defaults, or set them so "
            "they match")
