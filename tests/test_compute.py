"""`cruijff resources`: suggestions from a history of recorded stage runs, checked against a
hand computation; family scaling; refusals; --apply's round trip."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from compute_support import (
    GIB,
    M1,
    M3,
    Attempt,
    make_history,
    make_target,
    write_experiment,
)

from cruijff.compute import Policy, gather, read_target, suggest_all
from cruijff.models import parameter_count
from cruijff.settings import ExperimentConfig, ResourceProfile
from cruijff.slurm import sbatch_options

K1, K3 = "meta-llama__Llama-3.2-1B-Instruct", "meta-llama__Llama-3.2-3B-Instruct"

SOURCE = """\
# The lab's config: these comments stay.
model_dir: models
resources:
  default:
    time: "00:30:00"   # half an hour
  meta-llama__Llama-3.2-1B-Instruct:
    mem: 8
    gres: 1   # one GPU

# How it runs
orchestration:
  executor: slurm  # on the cluster
"""


def resources(cli, *args):
    result = cli("resources", *map(str, args), "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    return {(s["key"], s["stage"]): s for s in data["suggestions"]}, data


@pytest.fixture
def lab(tmp_path):
    """20 past experiments (tests/compute_support.py) and a new one, built from SOURCE, that
    fine-tunes on twice their examples and evaluates twice their samples."""
    make_history(tmp_path / "runs")
    source = tmp_path / "lab" / "config.yaml"
    source.parent.mkdir()
    source.write_text(SOURCE)
    return tmp_path, make_target(tmp_path / "new", config_path=source), source


def test_the_suggestion_is_the_quantile_of_what_runs_used_times_the_margin(cli, lab):
    tmp_path, target, _ = lab
    found, data = resources(cli, target, "--root", tmp_path / "runs")
    assert data["runs"] == 40 and data["experiments"] == 21  # 20 past, and the target itself
    finetune, evaluation = found[(K1, "finetune")], found[(K1, "eval")]
    # Fine-tune memory: runs used 1, 2, ..., 20 GiB. numpy's linear quantile at 0.95 sits at
    # position 0.95 x 19 = 18.05 of the sorted list: 19 + 0.05 x 1 = 19.05 GiB; x 1.25 =
    # 23.8125, up to whole G: 24.
    assert finetune["mem"] == 24
    # Fine-tune time: run i took 600 + 60 i s, the first 100 s startup (train_s = wall - 100),
    # on 1 epoch x 100 examples; the new one does 2 x 100: ratio 2. Scaled: 100 + 2 (wall -
    # 100) = 1100 + 120 i; Q0.95 = 1100 + 120 x 18.05 = 3266 s; x 1.5 = 4899 s; up to 5 min:
    # 5100 s.
    assert finetune["time"] == "01:25:00"
    assert finetune["gres"] == 2  # run 7 used two GPUs (run 3's second one only 500 MiB)
    # Eval memory: 0.5, 1, ..., 10 GiB: Q0.95 = 0.5 + 0.5 x 18.05 = 9.525; x 1.25 = 11.9 -> 12.
    assert evaluation["mem"] == 12
    # Eval time: 60 + 10 i s on 100 samples, no eval_s reported, so the whole wall scales by
    # 200 / 100: 120 + 20 i; Q0.95 = 120 + 20 x 18.05 = 481 s; x 1.5 = 721.5 s; up: 900 s.
    assert evaluation["time"] == "00:15:00"
    assert evaluation["gres"] is None  # no eval used a GPU
    assert "whole wall time scaled" in " ".join(evaluation["notes"])
    assert finetune["basis"] == f"from 20 runs of {M1}"


def test_margins_and_quantile_are_options(cli, lab):
    tmp_path, target, _ = lab
    found, _ = resources(cli, target, "--root", tmp_path / "runs", "--quantile", "0.5",
                         "--memory-margin", "1", "--time-margin", "1")
    # Median of 1..20 GiB = 10.5 -> 11G; of 1100 + 120 i: 1100 + 120 x 9.5 = 2240 s -> 2400 s.
    assert found[(K1, "finetune")]["mem"] == 11
    assert found[(K1, "finetune")]["time"] == "00:40:00"


def test_sacct_maxrss_counts_when_it_saw_more_and_unfinished_or_reused_runs_do_not(cli, lab):
    tmp_path, target, _ = lab
    runs = tmp_path / "runs"
    write_experiment(runs, "killed", M1, [  # the last snapshot of a killed attempt
        Attempt("finetune", 99999, 500 * GIB, final=False, status="failed")])
    write_experiment(runs, "shared", M1, [Attempt("finetune", 99999, reused_from="b")])
    write_experiment(runs, "sacct", M1, [  # the launcher saw 1 GiB, Slurm 40 GiB
        Attempt("finetune", 600, 1 * GIB, sacct_mib=40 * GIB,
                size={"epochs": 1, "train_examples": 100})])
    found, _ = resources(cli, target, "--root", runs, "--quantile", "1")
    assert found[(K1, "finetune")]["runs"] == 21
    # The most: Slurm's 40 GiB (not the killed attempt's 500); x 1.25 = 50.
    assert found[(K1, "finetune")]["mem"] == 50


def test_a_run_is_counted_once_whatever_lists_it(cli, lab):
    tmp_path, target, _ = lab
    found, data = resources(cli, target, "--root", tmp_path / "runs", "--root",
                            tmp_path / "runs", "--root", tmp_path / "new")
    assert data["runs"] == 40 and found[(K1, "finetune")]["runs"] == 20


def test_a_model_that_never_ran_is_scaled_from_another_size_of_its_family(cli, lab):
    tmp_path, _, _ = lab
    target = make_target(tmp_path / "bigger", model=M3, parameters=3e9)
    found, _ = resources(cli, target, "--root", tmp_path / "runs")
    finetune = found[(K3, "finetune")]
    # The 1B runs scaled by parameters 3e9 / 1e9 = 3: memory 19.05 GiB x 3 = 57.15 x 1.25 =
    # 71.4375 -> 72; time 3266 s x 3 = 9798 x 1.5 = 14697 -> 14700 s.
    assert finetune["mem"] == 72 and finetune["time"] == "04:05:00"
    assert finetune["basis"] == (f"from 20 runs of {M1}, scaled ×3.00 by parameters "
                                 "1.00B→3.00B")
    result = cli("resources", target, "--root", tmp_path / "runs")
    assert "scaled ×3.00 by parameters 1.00B→3.00B" in result.out


def test_too_few_runs_give_no_figure_and_say_how_many(cli, tmp_path):
    make_history(tmp_path / "runs", n=4)
    target = make_target(tmp_path / "new")
    found, _ = resources(cli, target, "--root", tmp_path / "runs")
    assert found[(K1, "finetune")]["mem"] is None
    assert found[(K1, "finetune")]["refused"] == "4 runs of finetune, 5 needed"
    result = cli("resources", target, "--root", tmp_path / "runs")
    assert result.code == 0
    assert f"{K1}/finetune: no suggestion: 4 runs of finetune, 5 needed" in result.out
    found, _ = resources(cli, target, "--root", tmp_path / "runs", "--min-runs", "4")
    assert found[(K1, "finetune")]["mem"] is not None


def test_never_below_what_ran_out_of_memory_or_time(cli, lab):
    tmp_path, target, _ = lab
    write_experiment(tmp_path / "runs", "oom", M1, [Attempt(
        "finetune", 300, 30 * GIB, status="failed", outcome="OUT_OF_MEMORY",
        requested={"mem_mib": 30 * GIB, "time_s": 3600})])
    write_experiment(tmp_path / "runs", "slow", M1, [Attempt(
        "finetune", 7200, 2 * GIB, status="failed", outcome="TIMEOUT",
        requested={"mem_mib": 8 * GIB, "time_s": 7200})])
    found, _ = resources(cli, target, "--root", tmp_path / "runs")
    finetune = found[(K1, "finetune")]
    assert finetune["mem"] == 38  # 30G x 1.25 = 37.5 -> 38, above the quantile's 24
    assert finetune["time"] == "02:30:00"  # 7200 s x 1.25 = 9000 s, above 01:25:00
    assert "mem raised to 38G: oom/trial-a asked 30G and ran OUT_OF_MEMORY" in finetune["notes"]


def test_bad_options_are_one_line(cli, lab):
    _, target, _ = lab
    for args, words in ((["--quantile", "1.5"], "--quantile 1.5"),
                        (["--memory-margin", "0.9"], "at least 1"),
                        (["--yes"], "go with --apply"),
                        (["--store"], "CRUIJFF_DATABASE_URL")):
        result = cli("resources", target, *args)
        assert result.code == 2 and words in result.err and len(result.err.splitlines()) == 1


def test_apply_round_trips(cli, lab):
    tmp_path, target, source = lab
    result = cli("resources", target, "--root", tmp_path / "runs", "--apply", "--yes")
    assert result.code == 0, result.err
    assert "+    stages:" in result.out and "rebuild the experiment to use it" in result.out
    text = source.read_text()
    for comment in ("# The lab's config: these comments stay.", "# half an hour",
                    "# one GPU", "# How it runs", "# on the cluster"):
        assert comment in text
    config = ExperimentConfig.load(source)
    assert config.resources_for(K1, "finetune").requests() == {
        "time": "01:25:00", "mem": 24, "gres": 2}
    assert config.resources_for(K1, "eval").requests() == {
        "time": "00:15:00", "mem": 12, "gres": 1}
    assert config.resources_for(K1).requests() == {"time": "00:30:00", "mem": 8, "gres": 1}
    [archived] = (source.parent / ".archive").iterdir()
    assert archived.read_text() == SOURCE
    # only resources.<model>.stages changed: everything else reads as before
    before, after = yaml.safe_load(SOURCE), yaml.safe_load(text)
    stages = after["resources"][K1].pop("stages")
    assert after == before and set(stages) == {"finetune", "eval"}

    again = cli("resources", target, "--root", tmp_path / "runs", "--apply", "--yes")
    assert again.code == 0 and "nothing to change" in again.out and "+++" not in again.out
    assert source.read_text() == text and len(list((source.parent / ".archive").iterdir())) == 1


def test_apply_asks_first_and_writes_nothing_when_declined(cli, lab, monkeypatch):
    tmp_path, target, source = lab
    monkeypatch.setattr("typer.confirm", lambda *a, **k: False)
    result = cli("resources", target, "--root", tmp_path / "runs", "--apply")
    assert result.code == 0 and "Nothing written." in result.out and "+      finetune:" \
        in result.out
    assert source.read_text() == SOURCE and not (source.parent / ".archive").exists()


def test_apply_edits_the_config_given_and_only_one_cruijff_reads(cli, lab, tmp_path):
    _, target, _ = lab
    shared = "resources:\n  default: &base {mem: 8}\n  meta-llama__Llama-3.2-1B-Instruct: *base\n"
    other = tmp_path / "other.yaml"
    other.write_text(shared)  # an edit through an alias would change both profiles
    result = cli("resources", target, "--root", tmp_path / "runs", "--apply", "--yes",
                 "--config", other)
    assert result.code == 2 and "aliases (*name) are not allowed" in result.err
    assert other.read_text() == shared and not (tmp_path / ".archive").exists()
    plain = tmp_path / "plain.yaml"
    plain.write_text("use_fine_tune: true\n")
    result = cli("resources", target, "--root", tmp_path / "runs", "--apply", "--yes",
                 "--config", plain)
    assert result.code == 0, result.err
    assert ExperimentConfig.load(plain).resources_for(K1, "finetune").mem == 24


def test_an_experiment_built_before_per_stage_profiles_and_sizes_still_reads(cli, tmp_path):
    """Its trial config has `resources` alone and no `sizes`: times are not scaled."""
    make_history(tmp_path / "runs")
    old = write_experiment(tmp_path / "old", "old", M1, [], stages=["finetune"],
                           resources={"mem": 8, "time": "00:30:00"})
    found, _ = resources(cli, old, "--root", tmp_path / "runs")
    finetune = found[(K1, "finetune")]
    assert finetune["asked"] == {"mem": 8, "time": "00:30:00"}
    # unscaled walls 600 + 60 i: Q0.95 = 600 + 60 x 18.05 = 1683 s; x 1.5 = 2524.5 -> 2700 s
    assert finetune["time"] == "00:45:00"
    assert "20 runs not scaled (sizes unknown)" in finetune["notes"]


def test_a_stage_profile_comes_from_stage_resources(tmp_path):
    path = write_experiment(tmp_path, "x", M1, [], stages=["finetune", "eval"],
                            resources={"mem": 16, "time": "02:00:00"},
                            stage_resources={"finetune": {"mem": 16, "time": "02:00:00"},
                                             "eval": {"mem": 8, "time": "00:30:00"}})
    demands = {d.stage: d.asked for d in read_target(path).demands}
    assert demands == {"finetune": {"mem": 16, "time": "02:00:00"},
                       "eval": {"mem": 8, "time": "00:30:00"}}


def test_the_table_shows_asked_and_suggested(cli, lab, monkeypatch):
    tmp_path, target, _ = lab
    from cruijff.cli import out

    monkeypatch.setattr(out, "_width", 160)  # the table's rows on one line each
    result = cli("resources", target, "--root", tmp_path / "runs")
    assert result.code == 0, result.err
    assert "8G → 24G" in result.out and "00:30:00 → 01:25:00" in result.out
    assert f"{K1}/finetune: from 20 runs of {M1}" in result.out


def test_suggest_all_from_the_core(lab):
    tmp_path, target, _ = lab
    history = gather([target], [tmp_path / "runs"])
    [finetune, evaluation] = suggest_all(read_target(target), history, Policy())
    assert (finetune.mem, finetune.time, evaluation.mem, evaluation.time) == (
        24, "01:25:00", 12, "00:15:00")


def test_parameters_come_from_safetensors_headers(tmp_path):
    def weights(path: Path, shapes: dict[str, list[int]]) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **{
            name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}
            for name, shape in shapes.items()}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header)

    weights(tmp_path / "model-00001-of-00002.safetensors", {"a": [1000, 64], "b": [64]})
    weights(tmp_path / "model-00002-of-00002.safetensors", {"c": [3, 4, 5]})
    assert parameter_count(tmp_path) == 64000 + 64 + 60
    (tmp_path / "bad.safetensors").write_bytes(b"\x01")
    assert parameter_count(tmp_path) is None
    assert parameter_count(tmp_path / "nothing") is None


def test_stage_overrides_never_reach_sbatch():
    profile = ResourceProfile(mem=8, stages={"finetune": {"mem": 16}})
    assert sbatch_options(profile) == ["--mem=8G"]


def test_the_store_gives_what_the_folders_give(cli, lab, monkeypatch):
    """The same history loaded into a results store (as `cruijff analyze` does) suggests the
    same; read beside the folders, each run counts once."""
    from cruijff.store import load_experiment_results, open_store

    tmp_path, target, _ = lab
    url = f"sqlite:///{tmp_path / 'lab.sqlite'}"
    with open_store(url) as store:
        for experiment in sorted((tmp_path / "runs").iterdir()):
            load_experiment_results(store, experiment)
    folders, _ = resources(cli, target, "--root", tmp_path / "runs")
    monkeypatch.setenv("CRUIJFF_DATABASE_URL", url)
    stored, data = resources(cli, target, "--store")
    assert data["runs"] == 40
    both, data = resources(cli, target, "--store", "--root", tmp_path / "runs")
    assert data["runs"] == 40
    for found in (stored, both):
        assert {k: (s["mem"], s["time"], s["runs"]) for k, s in found.items()} == {
            k: (s["mem"], s["time"], s["runs"]) for k, s in folders.items()}
