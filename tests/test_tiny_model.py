"""The tiny offline demo model: tokenization parity with torchtune, HF loading, atomic builds,
and the shipped torchtune config templates."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cruijff import tiny_model
from cruijff.tiny_model import TINY_MODEL_IDS, materialize

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "cruijff" / "configs"
TASK_DIR = REPO / "examples" / "capitalization" / "tasks" / "capitalization"
PLACEHOLDER = "FILLED_BY_CRUIJFF"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def random_model(tiny_random_model) -> Path:
    """cruijff/tiny-llama-random, materialized once per session (conftest.py)."""
    return tiny_random_model


@pytest.fixture(scope="module")
def cap_data():
    return _load(TASK_DIR / "data.py", "capitalization_data")


def _ids(x) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or a BatchEncoding, by version."""
    if isinstance(x, list):
        return x
    return list(x["input_ids"])


# --- tokenization parity -----------------------------------------------------------------


def test_prompt_tokens_match_torchtune_instruct_dataset(random_model, cap_data, tmp_path):
    """The eval prompt (HF chat template, as transformers and Inspect's hf/ provider build it)
    is token for token the prompt torchtune trains on (instruct_dataset, no prompt template)."""
    from torchtune.datasets import instruct_dataset
    from torchtune.models.llama2 import llama2_tokenizer
    from transformers import AutoTokenizer

    cap_data.build("words_5L_80_20.json", tmp_path)
    records = json.loads((tmp_path / "words_5L_80_20.json").read_text())["train"]
    records += [
        {"id": "r1", "input": "Repeat: heLLo", "output": "heLLo"},
        {"id": "r2", "input": "Repeat: WORLD", "output": "WORLD"},
        {"id": "odd", "input": "a  b, c! d? e-f's;", "output": "x y "},
        {"id": "lead", "input": " leading space", "output": " out"},
    ]
    data_file = tmp_path / "parity.json"
    data_file.write_text(json.dumps({"train": records}))

    tt_tok = llama2_tokenizer(
        str(random_model / "tokenizer.model"), max_seq_len=128, prompt_template=None
    )
    ds = instruct_dataset(
        tt_tok,
        source="json",
        data_files=str(data_file),
        field="train",
        split="train",
        column_map={"input": "input", "output": "output"},
        train_on_input=False,
        packed=False,
        cache_dir=str(tmp_path / "hf_datasets_cache"),
    )
    hf_tok = AutoTokenizer.from_pretrained(random_model)
    pretrain_transform = tiny_model._sft_transform(random_model / "tokenizer.model")
    assert len(ds) == len(records)
    for i, rec in enumerate(records):
        sample = ds[i]
        tokens, labels = sample["tokens"], sample["labels"]
        n_prompt = next(j for j, lab in enumerate(labels) if lab != -100)
        prompt = tokens[:n_prompt]
        user = [{"role": "user", "content": rec["input"]}]
        # transformers: tokenize inside apply_chat_template
        hf_prompt = _ids(
            hf_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        )
        assert hf_prompt == prompt, rec
        # Inspect's hf provider: render to text, then call the tokenizer on it
        text = hf_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        assert hf_tok([text])["input_ids"][0] == prompt, rec
        # the whole conversation renders to the training sequence, EOS included
        conv = [*user, {"role": "assistant", "content": rec["output"]}]
        assert _ids(hf_tok.apply_chat_template(conv, tokenize=True)) == tokens, rec
        # the pretraining of cruijff/tiny-llama sees exactly the same sequences
        assert pretrain_transform(dict(rec))["tokens"] == tokens, rec

    first = ds[0]["tokens"]
    assert first[0] == tiny_model.BOS_ID and first[-1] == tiny_model.EOS_ID


def test_tokenizer_vocabulary(random_model, cap_data, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(random_model / "tokenizer.model"))
    assert sp.vocab_size() == tiny_model.VOCAB_SIZE == 64
    # every prompt character is one piece, never <unk>
    cap_data.build("words_6L_50_10.json", tmp_path)
    for split in json.loads((tmp_path / "words_6L_50_10.json").read_text()).values():
        for rec in split:
            for text in (rec["input"], rec["output"]):
                ids = sp.encode(text)
                assert tiny_model.UNK_ID not in ids
                assert len(ids) == len(text) + 1  # + the dummy-prefix space


# --- the HF model --------------------------------------------------------------------------


def test_random_model_loads_in_transformers_and_generates(random_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(random_model)
    model = AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.float32)
    cfg = json.loads((random_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 64
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    ids = _ids(
        tok.apply_chat_template(
            [{"role": "user", "content": "Capitalize: hello"}],
            add_generation_prompt=True,
            tokenize=True,
        )
    )
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=5)
    assert out.shape == (1, len(ids) + 5) or out[0, -1].item() == tiny_model.EOS_ID
    assert isinstance(tok.decode(out[0, len(ids) :], skip_special_tokens=True), str)


def test_hf_weights_match_torchtune_model(random_model):
    """tune_to_hf's q/k permutation is right: HF and torchtune give the same logits."""
    import torch
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.float32).eval()
    tt = tiny_model._new_model(seed=1234)
    tt.load_state_dict(
        hf_to_tune(
            load_file(str(random_model / "model.safetensors")),
            num_heads=tiny_model.NUM_HEADS,
            num_kv_heads=tiny_model.NUM_KV_HEADS,
            dim=tiny_model.EMBED_DIM,
        )
    )
    tt.eval()
    x = torch.tensor([[1, 3, 47, 8, 19, 8, 4, 23, 56, 3, 11, 8, 41, 41, 18]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, tt(x), atol=1e-5, rtol=1e-4)


# --- materialize -----------------------------------------------------------------------------


def test_materialize_is_idempotent_and_deterministic(random_model, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in random_model.iterdir()}
    materialize("cruijff/tiny-llama-random", random_model)  # exists: left alone
    assert {p.name: p.stat().st_mtime_ns for p in random_model.iterdir()} == before
    assert sorted(before) == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )
    again = tmp_path / "again"
    materialize("cruijff/tiny-llama-random", again)
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json", "config.json"):
        a = hashlib.sha256((random_model / name).read_bytes()).hexdigest()
        b = hashlib.sha256((again / name).read_bytes()).hexdigest()
        assert a == b, name
    # nothing but the model directory is left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_materialize_fills_an_empty_directory(tmp_path):
    dest = tmp_path / "cruijff__tiny-llama-random"
    dest.mkdir()
    materialize("cruijff/tiny-llama-random", dest)
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.model").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


def test_materialize_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(model_id, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_model, "_build", broken)
    dest = tmp_path / "models" / "cruijff__tiny-llama-random"
    with pytest.raises(RuntimeError, match="boom"):
        materialize("cruijff/tiny-llama-random", dest)
    assert not dest.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_materialize_rejects_unknown_ids(tmp_path):
    assert frozenset({"cruijff/tiny-llama", "cruijff/tiny-llama-random", "cruijff/tiny-llama3",
                      "cruijff/tiny-qwen2.5"}) == TINY_MODEL_IDS
    with pytest.raises(ValueError, match="unknown tiny model"):
        materialize("cruijff/huge-llama", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- capitalization data -----------------------------------------------------------------------


def test_capitalization_data_splits_and_reproducibility(cap_data, tmp_path):
    cap_data.build("words_5L_80_1000.json", tmp_path / "a")
    cap_data.build("words_5L_80_1000.json", tmp_path / "b")
    a = (tmp_path / "a" / "words_5L_80_1000.json").read_bytes()
    assert a == (tmp_path / "b" / "words_5L_80_1000.json").read_bytes()
    data = json.loads(a)
    assert {k: len(v) for k, v in data.items()} == {"train": 720, "validation": 80, "test": 200}
    recs = [r for split in data.values() for r in split]
    words = [r["input"].removeprefix("Capitalize: ") for r in recs]
    assert len(set(words)) == 1000 and all(re.fullmatch("[a-z]{5}", w) for w in words)
    assert all(r["output"] == r["input"].removeprefix("Capitalize: ").upper() for r in recs)
    assert len({r["id"] for r in recs}) == 1000
    cap_data.build("words_5L_80_999.json", tmp_path / "a")
    other = json.loads((tmp_path / "a" / "words_5L_80_999.json").read_text())
    assert other["train"][0] != data["train"][0]  # the name seeds the words


@pytest.mark.parametrize("name", ["words.json", "words_5_80_100.json", "words_5L_180_100.json"])
def test_capitalization_data_rejects_unknown_names(cap_data, tmp_path, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        cap_data.build(name, tmp_path)


# --- torchtune config templates ----------------------------------------------------------------


def _placeholders(node, prefix="") -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            found |= _placeholders(v, f"{prefix}{k}.")
    elif node == PLACEHOLDER:
        found.add(prefix.rstrip("."))
    return found


def _fill(template: Path, model_dir: Path, data_file: Path, out: Path, **overrides) -> Path:
    cfg = yaml.safe_load(template.read_text())
    cfg["output_dir"] = str(out)
    cfg["checkpointer"]["checkpoint_dir"] = str(model_dir)
    cfg["checkpointer"]["checkpoint_files"] = ["model.safetensors"]
    cfg["tokenizer"]["path"] = str(model_dir / "tokenizer.model")
    cfg["metric_logger"]["log_dir"] = str(out / "logs")
    cfg["dataset"]["data_files"] = str(data_file)
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    assert not _placeholders(cfg)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["tiny_llama_lora.yaml", "tiny_llama_full.yaml"])
def test_config_templates_mark_what_cruijff_fills(name):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    assert _placeholders(cfg) == {
        "output_dir",
        "checkpointer.checkpoint_dir",
        "checkpointer.checkpoint_files",
        "tokenizer.path",
        "metric_logger.log_dir",
        "dataset.data_files",
    }
    assert cfg["checkpointer"]["output_dir"] == "${output_dir}"
    assert cfg["tokenizer"]["prompt_template"] is None
    model = cfg["model"]
    hf = tiny_model._hf_config()
    assert (model["vocab_size"], model["embed_dim"], model["num_layers"]) == (
        hf["vocab_size"],
        hf["hidden_size"],
        hf["num_hidden_layers"],
    )
    assert (model["num_heads"], model["num_kv_heads"], model["intermediate_dim"]) == (
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
        hf["intermediate_size"],
    )


def _losses(log_dir: Path) -> list[float]:
    (log_file,) = log_dir.glob("*.txt")
    return [float(m) for m in re.findall(r"loss:([0-9.eE+-]+)", log_file.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "recipe"),
    [
        ("tiny_llama_lora.yaml", "lora_finetune_single_device"),
        ("tiny_llama_full.yaml", "full_finetune_single_device"),
    ],
)
def test_tune_run_from_template_trains(random_model, cap_data, tmp_path, name, recipe):
    """`tune run <recipe> --config <filled template>`: 1 short epoch, the loss goes down,
    and the output epoch folder loads in transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cap_data.build("words_5L_80_200.json", tmp_path / "data")
    out = tmp_path / "run"
    config = _fill(
        CONFIGS / name,
        random_model,
        tmp_path / "data" / "words_5L_80_200.json",
        out,
        epochs=1,
        max_steps_per_epoch=6,
        lr_scheduler__num_warmup_steps=1,
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"),
    }
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run(
        [str(tune), "run", recipe, "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(out / "logs")
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    epoch = out / "epoch_0"
    assert (epoch / "model-00001-of-00001.safetensors").exists()
    assert (epoch / "tokenizer.json").exists() and (epoch / "tokenizer.model").exists()
    AutoTokenizer.from_pretrained(epoch)
    AutoModelForCausalLM.from_pretrained(epoch, dtype=torch.float32)
