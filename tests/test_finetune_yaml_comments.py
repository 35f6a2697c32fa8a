"""A trial's finetune.yaml keeps the comments of the config it started from (cruijff's
template or the researcher's finetune_config), so it reads like torchtune's own configs; no
comment is left to contradict a value cruijff or the design set, and the comments change
nothing that torchtune or cruijff reads."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from cruijff.fileio import dump_yaml, load_yaml_mapping, parse_yaml
from cruijff.metric_capture import CAPTURE_KEY
from cruijff.yaml_comments import dump_commented

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "cruijff" / "configs" / "tiny_llama_lora.yaml"

USER_CONFIG = """\
# My lab's LoRA config.
output_dir: /tmp/mine  # /tmp may be deleted by your system

# Model Arguments
model:
  _component_: torchtune.models.llama2.lora_llama2
  vocab_size: 64
  num_layers: 4
  num_heads: 4
  num_kv_heads: 2
  embed_dim: 128
  intermediate_dim: 384
  max_seq_len: 128
  lora_attn_modules: [q_proj, v_proj]
  lora_rank: 16  # higher increases accuracy and memory
  lora_alpha: 32  # usually alpha=2*rank
  lora_dropout: 0.0
tokenizer:
  _component_: torchtune.models.llama2.llama2_tokenizer
  path: /tmp/tokenizer.model
  max_seq_len: 128
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: /tmp/model
  checkpoint_files: [model.safetensors]
  output_dir: ${output_dir}
  model_type: LLAMA2
resume_from_checkpoint: false
dataset:
  _component_: torchtune.datasets.instruct_dataset
  source: json
  packed: false  # True increases speed
seed: 0
shuffle: true
batch_size: 4
optimizer:
  _component_: torch.optim.AdamW
  lr: 3e-4
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 0
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
epochs: 1  # one pass is enough here
max_steps_per_epoch: null
gradient_accumulation_steps: 1
device: cpu
dtype: fp32

# Logging
metric_logger:
  # to the lab's W&B project, offline on the cluster
  _component_: torchtune.training.metric_logging.WandBLogger
  project: lab  # W&B project
  mode: offline
log_every_n_steps: 1
"""


def _build(cli, project, *treatments: str, config: str | None = None,
           controls: tuple[str, ...] = ()) -> Path:
    if config is not None:
        (project.root / "mine.yaml").write_text(config)
        project.config.write_text(f"{project.config.read_text()}finetune_config: mine.yaml\n")
    args = [a for t in treatments for a in ("--treatment", t)]
    args += [a for c in controls for a in ("--control", c)]
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", *args, "--name", "exp",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    return project.experiments / "exp"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_the_template_comments_are_kept(cli, project):
    exp = _build(cli, project, "finetune.model.lora_rank=4")
    text = (exp / "trial-b" / "finetune.yaml").read_text()
    template = TINY.read_text()
    header = template.split("\n\n", 1)[0]
    assert text.startswith(header + "\n\n")  # the template's header, as it is
    for section in ("# ---- Model ---", "# ---- Tokenizer ---", "# ---- Logging ---",
                    "# DiskLogger writes one line per step"):
        assert section in text
    lines = _lines(exp / "trial-b" / "finetune.yaml")
    trial = exp / "trial-b"
    # a value cruijff fills in keeps the comment that says what it is
    assert f"output_dir: {trial / 'checkpoints'}  # the trial's fine-tune output directory" in lines
    assert "max_steps_per_epoch: null  # an integer caps each epoch (smoke tests)" in lines
    assert "  lora_rank: 4" in lines
    assert any(line.startswith(f"{CAPTURE_KEY}: ") and "# cruijff's:" in line for line in lines)


def test_no_comment_contradicts_a_value_cruijff_or_the_design_set(cli, project):
    exp = _build(cli, project, "finetune.model.lora_rank=4", config=USER_CONFIG,
                 controls=("finetune.epochs=3", "finetune.metric_logger._component_="
                           "torchtune.training.metric_logging.StdoutLogger"))
    lines = _lines(exp / "trial-b" / "finetune.yaml")
    text = "\n".join(lines)
    assert lines[0] == "# My lab's LoRA config."
    assert "# Model Arguments" in lines
    assert "  lora_alpha: 32  # usually alpha=2*rank" in lines  # unchanged: its comment stays
    assert "  packed: false  # True increases speed" in lines
    assert "  lora_rank: 4" in lines  # changed: "higher increases ..." was about 16
    assert "epochs: 3" in lines
    assert "/tmp may be deleted" not in text  # cruijff moved output_dir into the trial
    # the logger is another component now: what was said of the W&B one is gone with it
    assert "W&B" not in text and "# Logging" not in text


def test_the_comments_change_no_value_and_no_stage_key(cli, project):
    """finetune.yaml loads to exactly the config cruijff resolved (its plain dump), and
    trials whose configs are equal have equal text, so equal keys (fine-tunes are shared)."""
    exp = _build(cli, project, "eval.limit=2", config=USER_CONFIG)
    a, b = (exp / f"trial-{t}" / "finetune.yaml" for t in "ab")
    data = load_yaml_mapping(b)
    assert parse_yaml(dump_yaml(data), "plain") == data
    assert a.read_text().replace(str(a.parent), "<trial>") == \
        b.read_text().replace(str(b.parent), "<trial>")

    from cruijff.runner import load_experiment, stage_key

    trials = load_experiment(exp).trials
    assert stage_key(trials[0], "finetune") == stage_key(trials[1], "finetune")


@pytest.mark.parametrize("value", [
    "two\nlines # not a comment",
    "x: y",
    "a very long string " * 20,
    "# hash",
    "",
    None,
    [1, {"k": "v"}],
    {},
])
def test_any_value_loads_back_exactly(tmp_path, value):
    template = tmp_path / "t.yaml"
    template.write_text(textwrap.dedent("""\
        # header
        a: 1  # one
        b:
          on: 2  # a key YAML would read as true, quoted in the dump
          c: old  # about old
          d: 4
        e: 5  # five
        """))
    data = {"a": 1, "b": {"on": 2, "c": value, "d": 4}, "e": 5, "new": value}
    text = dump_commented(data, template, {"new": "cruijff's"})
    assert parse_yaml(text, "written") == data
    assert yaml.safe_load(text) == data
    assert "a: 1  # one" in text and "e: 5  # five" in text and "# header" in text
    assert "# about old" not in text  # c changed


def test_a_template_that_cannot_be_read_leaves_the_plain_dump(tmp_path):
    data = {"a": 1}
    assert dump_commented(data, tmp_path / "gone.yaml") == dump_yaml(data)
