"""Every model family cruijff names runs through the code a hub model takes: family-shaped
tiny models (cruijff/tiny_families.py), train/eval prompt parity (cruijff/prompt_format.py),
and a build -> run -> summary -> analyze of each family on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import cruijff, make_site

from cruijff.models import family_of, torchtune_config_path
from cruijff.prompt_format import SYSTEM_PROMPT, eval_ids, mismatch
from cruijff.stages.finetune import _load_default

FAMILY_MODELS = ("cruijff/tiny-llama3", "cruijff/tiny-qwen2.5")
ALL_MODELS = ("cruijff/tiny-llama-random", *FAMILY_MODELS)
RECORD = {"input": "Capitalize: hello", "output": "HELLO"}
FORMAT_TOKENS = {
    "cruijff/tiny-llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                            "<|finetune_right_pad_id|>", "<|python_tag|>"),
    "cruijff/tiny-qwen2.5": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                             "</tool_call>"),
}
LAYOUT = {
    "cruijff/tiny-llama3": {"config.json", "generation_config.json", "model.safetensors",
                            "original/tokenizer.model", "original/params.json",
                            "special_tokens_map.json", "tokenizer.json",
                            "tokenizer_config.json"},
    "cruijff/tiny-qwen2.5": {"config.json", "generation_config.json", "model.safetensors",
                             "merges.txt", "vocab.json", "tokenizer.json",
                             "tokenizer_config.json"},
}


def tokenizer_section(model: str, path: Path) -> dict[str, Any]:
    """The tokenizer section the family's fine-tune config gets (as FinetuneStage sets it)."""
    family = family_of(model)
    assert family is not None
    section = dict(_load_default(torchtune_config_path(family.lora[1]))["tokenizer"])
    for key, relative in family.files.items():
        section[key.removeprefix("tokenizer.")] = str(path / relative)
    return section


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_family_model_has_its_hubs_layout_and_sizes(model, family_models):
    path = family_models[model]
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert files == LAYOUT[model]
    config = json.loads((path / "config.json").read_text())
    family = {"cruijff/tiny-llama3": ("llama", "LlamaForCausalLM", 128256),
              "cruijff/tiny-qwen2.5": ("qwen2", "Qwen2ForCausalLM", 151936)}[model]
    assert (config["model_type"], config["architectures"][0], config["vocab_size"]) == family
    assert config["tie_word_embeddings"] is True


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_family_tokenizers_agree_with_torchtunes(model, family_models):
    """The HF tokenizer.json and the file torchtune reads split text the same way, and the
    special tokens sit at torchtune's ids."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from transformers import AutoTokenizer

    path = family_models[model]
    hf = AutoTokenizer.from_pretrained(str(path))
    tt = tt_config.instantiate(OmegaConf.create(tokenizer_section(model, path)))
    for text in ("Capitalize: hello", "HELLO world, 12345 times!\n\nok", "  ümlaut 日本  "):
        assert hf(text, add_special_tokens=False)["input_ids"] == tt.encode(
            text, add_bos=False, add_eos=False)
    named = {t: tt.special_tokens[t] for t in FORMAT_TOKENS[model]}
    assert {t: hf.convert_tokens_to_ids(t) for t in named} == named
    assert {tt.bos_id, tt.eos_id} <= set(named.values()) | {None}


@pytest.mark.parametrize("model", ALL_MODELS)
def test_the_eval_prompts_in_the_format_the_finetune_trained_in(model, family_models):
    """For each family's own pairing: Inspect's hf provider, really loaded, sends exactly
    torchtune's training tokens up to the answer, with and without a system prompt."""
    from inspect_ai.model import ChatMessageSystem, ChatMessageUser
    from inspect_ai.model._providers.hf import HuggingFaceAPI

    family = family_of(model)
    assert family is not None
    path = family_models[model]
    args = dict(family.eval_model_args)
    assert mismatch(tokenizer_section(model, path), path, args, RECORD) is None
    api = HuggingFaceAPI(str(path), **args)
    for system in (None, SYSTEM_PROMPT):
        messages = [*([ChatMessageSystem(content=system)] if system else []),
                    ChatMessageUser(content=RECORD["input"])]
        text = api.hf_chat(messages, [])
        sent = api.tokenizer(text, **(api.tokenizer_call_args or {}))["input_ids"]
        assert sent == eval_ids(path, args, RECORD["input"], system)


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_the_hubs_own_chat_template_would_not_match_training(model, family_models):
    """Why cruijff passes its own template: the folder's (the hub's) adds a system turn that
    torchtune never writes, and Llama 3's tokenizer a second BOS."""
    path = family_models[model]
    problem = mismatch(tokenizer_section(model, path), path, {"device": "cpu"}, RECORD)
    assert problem is not None and "without a system prompt" in problem


@pytest.mark.parametrize(("control", "expected"), [
    (["--control", "eval.model_args.use_chat_template=false"],
     "differs from the fine-tune's at token 0"),
    (["--controls", '{"eval.model_args.tokenizer_call_args": {}}'],
     "differs from the fine-tune's at token 1"),
    (["--control", "finetune.tokenizer.path=/no/such/tokenizer.model"], "is not a file"),
])
def test_a_config_that_breaks_parity_is_refused_at_build(cli, tmp_path, family_models,
                                                         monkeypatch, control, expected):
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    site = make_site(tmp_path, family_models["cruijff/tiny-llama3"])
    result = cli("build", "--config-path", site / "config.yaml", "--root", site,
                 "--task", "capitalization", "--dataset", "words_5L_80_100.json",
                 "--model", "cruijff/tiny-llama3", *control, "--name", "bad")
    assert result.code == 2, result.out + result.err
    assert expected in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not (site / "bad").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_each_family_builds_runs_and_is_analyzed(model, family_models, tmp_path,
                                                 prefect_env):
    """A fine-tune (a few steps) and two evals (10 samples, one with a system prompt) of the
    family-shaped model: the checkpoint loads in transformers, accuracy and loss reach the
    summary and the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    site = make_site(tmp_path, family_models[model])
    result = cruijff(
        "run", "--config-path", site / "config.yaml", "--root", site, "--name", "fam",
        "--task", "capitalization", "--dataset", "words_5L_80_100.json", "--model", model,
        "--control", "finetune.max_steps_per_epoch=2", "--control", "finetune.batch_size=2",
        "--control", "finetune.gradient_accumulation_steps=1",
        "--control", "finetune.lr_scheduler.num_warmup_steps=0", "--control", "eval.limit=10",
        "--treatment", f"eval.system_prompt={SYSTEM_PROMPT}", env=prefect_env)
    assert result.returncode == 0, result.stdout + result.stderr
    exp = site / "fam"
    final = exp / "trial-a" / "checkpoints" / "final"
    loaded = AutoModelForCausalLM.from_pretrained(str(final))
    assert loaded.config.vocab_size == family_models_vocab(model)
    assert AutoTokenizer.from_pretrained(str(final)).chat_template  # the hub's files came along

    summary = json.loads(cruijff("summary", exp, "--json", env=prefect_env).stdout)
    states = {(t["id"], name): stage["state"] for t in summary["trials"]
              for name, stage in t["stages"].items()}
    assert states == {("a", "finetune"): "done", ("a", "eval"): "done",
                      ("b", "finetune"): "reused", ("b", "eval"): "done"}
    analyzed = cruijff("analyze", exp, "--json", env=prefect_env)
    assert analyzed.returncode == 0, analyzed.stderr
    trials = json.loads(analyzed.stdout)["trials"]
    assert [(t["id"], t["metric"]["n"]) for t in trials] == [("a", 10), ("b", 10)]
    assert all(t["final_loss"] is not None and t["steps"] == 2 for t in trials)
    assert "accuracy" in (exp / "report" / "report.md").read_text()


def family_models_vocab(model: str) -> int:
    return {"cruijff/tiny-llama3": 128256, "cruijff/tiny-qwen2.5": 151936}[model]
