"""Caches with honest invalidation: model and data fingerprints are computed once per process
while their files stay the same, and again when one changes (content, size, mtime, or a file
replaced by another); a stage's key follows its config's data, not its comments; YAML is
written by a faster path with the same bytes; a large build prints a bounded table."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

import cruijff.models
import cruijff.runner
from cruijff import fileio
from cruijff.errors import CruijffError
from cruijff.models import file_digest, model_fingerprint
from cruijff.runner import _text_key, load_experiment, stage_key, trial_states
from cruijff.state import StageRecord, write_record
from cruijff.yaml_emit import Unwritable, dump_plain


def replace_keeping_stat(path: Path, content: bytes) -> None:
    """Put other bytes of the same size at `path` with its mtime: only the inode says so."""
    stat = path.stat()
    assert len(content) == stat.st_size
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(content)
    os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(fresh, path)


@pytest.fixture
def model_copy(tmp_path, tiny_random_model) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for file in tiny_random_model.iterdir():
        if file.is_file():
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def test_a_model_is_fingerprinted_once_while_its_files_stay(model_copy, monkeypatch):
    calls = []
    real = cruijff.models.model_folder_fingerprint
    monkeypatch.setattr(cruijff.models, "model_folder_fingerprint",
                        lambda folder: calls.append(folder) or real(folder))
    first = model_fingerprint(model_copy)
    assert [model_fingerprint(model_copy) for _ in range(3)] == [first] * 3
    assert len(calls) == 1

    config = model_copy / "config.json"
    config.write_text(config.read_text() + " ")  # content and size
    second = model_fingerprint(model_copy)
    assert second != first and len(calls) == 2

    text = config.read_bytes()
    replace_keeping_stat(config, text[:-1] + b"\n")  # same size and mtime, another file
    third = model_fingerprint(model_copy)
    assert third not in (first, second) and len(calls) == 3

    (model_copy / "extra.txt").write_text("x")  # a file added
    assert model_fingerprint(model_copy) != third
    (model_copy / "extra.txt").unlink()
    assert model_fingerprint(model_copy) == third
    assert model_fingerprint(model_copy) == real(model_copy)


def test_a_look_at_an_experiment_walks_a_model_folder_once_a_run_each_time(model_copy,
                                                                            monkeypatch):
    """summary/analyze ask for the fingerprint once per stage of every trial and are over in
    a second: within fingerprints_once the folder is walked once; outside (a run, during
    which the folder may change) each time."""
    walks = []
    real = cruijff.models._folder_signature
    monkeypatch.setattr(cruijff.models, "_folder_signature",
                        lambda folder: walks.append(folder) or real(folder))
    with cruijff.models.fingerprints_once():
        seen = {model_fingerprint(model_copy) for _ in range(5)}
    assert len(walks) == 1
    assert [model_fingerprint(model_copy) for _ in range(2)] == [*seen] * 2
    assert len(walks) == 3
    (model_copy / "config.json").write_text("{}")
    assert model_fingerprint(model_copy) not in seen  # outside it: the change is seen


def test_the_data_digest_follows_a_replaced_file(tmp_path):
    data = tmp_path / "d.json"
    data.write_text('{"a": 1}')
    first = file_digest(data)
    assert file_digest(data) == first
    replace_keeping_stat(data, b'{"a": 2}')
    assert file_digest(data) != first
    data.write_text('{"a": 1}')
    assert file_digest(data) == first


def commented_config(trial_dir: Path) -> Path:
    config = trial_dir / "finetune.yaml"
    assert "#" in config.read_text()  # from the commented template
    return config


def test_a_comment_edit_keeps_the_stage_key_a_value_edit_changes_it(built):
    trial = load_experiment(built).trial("a")
    config = commented_config(trial.dir)
    key = stage_key(trial, "finetune")
    config.write_text("# a note of mine\n" + config.read_text().replace(
        "\n", "  # and another\n", 3))
    assert stage_key(trial, "finetune") == key
    config.write_text(config.read_text().replace("epochs: ", "epochs: 1", 1))
    assert stage_key(trial, "finetune") != key


def test_configs_without_comments_keep_the_key_records_have(built):
    """What the build writes without comments is what dump_yaml writes: the key is as before
    (the key of the text), so a finished experiment is not run again."""
    trial = load_experiment(built).trial("a")
    text = (trial.dir / "eval.yaml").read_text()
    assert fileio.dump_yaml(fileio.parse_yaml(text, "eval.yaml")) == text
    assert stage_key(trial, "eval") == _text_key(trial, "eval")


def test_a_record_with_the_key_of_before_still_counts_as_done(built):
    """A commented finetune.yaml's key changed (it now leaves the comments out): a record
    written with the key of its text stays done while the text is what it ran."""
    exp = load_experiment(built)
    trial = exp.trial("a")
    old = _text_key(trial, "finetune")
    assert old != stage_key(trial, "finetune")
    write_record(trial.dir, StageRecord("finetune", old, "done", duration_s=1.0))
    assert trial_states(trial, ["finetune"], held=False)["finetune"].state == "done"
    assert cruijff.runner.is_done(trial, "finetune", stage_key(trial, "finetune"))
    config = commented_config(trial.dir)
    config.write_text(config.read_text().replace("epochs: ", "epochs: 1", 1))
    assert trial_states(trial, ["finetune"], held=False)["finetune"].state == "outdated"


def test_parsed_configs_are_kept_by_their_text(built, monkeypatch):
    """The parse of a config is kept in the trial's records folder, by the text's hash: a
    new process (a new ConfigData) parses nothing it parsed before; an unreadable config
    still has a key (its text), and the stage says what is wrong when it runs."""
    trial = load_experiment(built).trial("a")
    key = stage_key(trial, "finetune")
    fresh = cruijff.runner.ConfigData()
    monkeypatch.setattr(cruijff.runner, "CONFIG_DATA", fresh)
    monkeypatch.setattr(cruijff.runner, "parse_yaml", lambda *a: pytest.fail("parsed again"))
    assert stage_key(trial, "finetune") == key
    monkeypatch.undo()
    config = trial.dir / "finetune.yaml"
    config.write_text(config.read_text() + "\nbroken: [\n")
    assert stage_key(trial, "finetune") not in (key, None)


def test_the_build_keeps_its_configs_parsed_and_an_edit_is_read(built, monkeypatch):
    """The build keeps the data of the experiment's and its trials' config.yaml by their text's
    hash (.cruijff/parsed-configs.json): each entry is what its file parses to, a command
    parses none of them again, an edited one is parsed (only it), a cache file damaged or
    written by other versions is not believed, and no command writes it."""
    from cruijff import parse_cache
    from cruijff.fileio import load_yaml_mapping, parse_yaml
    from cruijff.parse_cache import PARSED_CONFIGS, text_sha
    from cruijff.state import RECORDS

    cache = built / RECORDS / PARSED_CONFIGS
    entries = json.loads(cache.read_text())["texts"]
    files = [built / "config.yaml", *built.glob("trial-*/config.yaml")]
    assert {text_sha(f.read_text()): load_yaml_mapping(f) for f in files} == entries
    assert all(parse_yaml(f.read_text(), str(f)) == entries[text_sha(f.read_text())]
               for f in files)

    real = parse_cache.load_yaml_mapping
    parsed: list[str] = []

    def counting(path, what, text=None):
        parsed.append(path.parent.name)
        return real(path, what, text=text)

    def new_process() -> None:
        monkeypatch.setattr(cruijff.runner, "_LOADED", {})

    monkeypatch.setattr(parse_cache, "load_yaml_mapping", counting)
    new_process()
    first = load_experiment(built)
    assert parsed == [] and len(first.trials) == len(files) - 1

    config = built / "trial-a" / "config.yaml"
    config.write_text(config.read_text().replace(f"label: {first.trial('a').label}",
                                                 "label: edited", 1))
    new_process()
    assert load_experiment(built).trial("a").label == "edited" and parsed == ["trial-a"]

    wrong = {sha: {**data, "label": "from the cache"} for sha, data in entries.items()}
    label = first.trial("a").label
    config.write_text(config.read_text().replace("label: edited", f"label: {label}"))
    tag = json.loads(cache.read_text())["written_by"]
    for written_by, text, seen in ((tag, None, "from the cache"),  # (what a hit reads)
                                   ("cruijff 0.0.0, PyYAML 1.0", None, label),
                                   (None, "{not json", label)):
        cache.write_text(text or json.dumps({"written_by": written_by, "texts": wrong}))
        new_process()
        assert load_experiment(built).trial("a").label == seen
    assert cache.read_text() == "{not json"  # loading never writes it


def plain_dump(data: object, **options: object) -> str:
    class Plain(yaml.CSafeDumper):
        def ignore_aliases(self, data: object) -> bool:
            return True

    return yaml.dump(data, Dumper=Plain, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, **options)


def test_the_fast_yaml_writer_writes_the_same_bytes(built):
    files = [p for p in built.rglob("*.yaml")]
    assert files
    for path in files:
        data = fileio.load_yaml(path)
        assert fileio.dump_yaml(data) == plain_dump(data)
        assert fileio.dump_yaml_unfolded(data) == plain_dump(data, width=10**9)
        if path.parent != built:  # a trial's files take the fast path (not PyYAML's)
            assert dump_plain(data, width=80, max_depth=fileio.MAX_DEPTH) == plain_dump(data)
    rnd = random.Random(17)
    words = ["-m", "--config", "-", "--", "---x", "...", ".hidden", "a b c", "a  b", "a -",
             "- a", "lora_rank=27", "=", "<<", "@x", "a@b", "x (y)", "/tmp/t-1/f.yaml",
             "hf//tmp/x", "1.5", "07", "0o7", "1_000", "+1", "Yes", "ON", "y", "n", "1:20",
             "tab\there", "it's", "00:30:00", "a'b c", " ".join(["word"] * 19),
             " ".join(["word"] * 16)]
    atoms = ["", "yes", "null", "~", "1e3", "0x1F", "-0", ".inf", "a: b", "# c", "ü", "x\ny",
             " lead", "z" * 120, "2024-01-01", "'q'", True, False, None, 0, -5, 3.5, 1e17,
             float("inf"), 10**30, 1e-05, 0.0003, -2.5, 1.0, -0.0, *words, *words]

    def value(pool: list, depth: int = 0) -> object:
        pick = rnd.random()
        if depth > 4 or pick < 0.4:
            return rnd.choice(pool)
        if pick < 0.7:
            return [value(pool, depth + 1) for _ in range(rnd.randint(0, 4))]
        keys = [a for a in pool if isinstance(a, str)] + [1, True, None, "k" * 130]
        return {rnd.choice(keys): value(pool, depth + 1) for _ in range(rnd.randint(0, 4))}

    plain_words = [w for w in words if w in ("-m", "--config", "a b c", "/tmp/t-1/f.yaml", "")]
    fast = 0
    for pool in (atoms, [*plain_words, "lora_rank=27", 3, True, None, 0.0003, 1e17]):
        for _ in range(2000):
            data = value(pool)
            assert fileio.dump_yaml(data) == plain_dump(data)
            assert fileio.dump_yaml_unfolded(data) == plain_dump(data, width=10**9)
            with contextlib.suppress(Unwritable):
                dump_plain(data, width=10**9, max_depth=fileio.MAX_DEPTH)
                fast += 1
    assert fast > 400  # the comparison covered the fast writer, not only its fallback


def test_the_fast_yaml_writer_refuses_what_cruijff_could_not_read_back():
    deep: list = []
    inner = deep
    for _ in range(fileio.MAX_DEPTH + 5):
        inner.append([])
        inner = inner[0]
    for bad in (deep, {"a": "\ud800"}, {"a": [{"b": ("\ud800",)}]}):
        with pytest.raises(CruijffError, match="cannot write a value"):
            fileio.dump_yaml(bad)
    shallow: dict = {}
    inner_map = shallow
    for _ in range(fileio.MAX_DEPTH - 1):
        inner_map["k"] = {}
        inner_map = inner_map["k"]
    assert fileio.parse_yaml(fileio.dump_yaml(shallow), "x") == shallow


def test_a_large_build_prints_a_bounded_table(cli, project, monkeypatch, tmp_path):
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    ranks = list(range(1, 61))
    args = ["build", "--config-path", project.config, "--task", "toy", "--model",
            "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatments",
            json.dumps({"finetune.model.lora_rank": ranks}), "--dry-run"]
    result = cli(*args, cwd=project.experiments)
    assert result.code == 0, result.err
    assert "… 41 more; --json or --verbose for all (61 trials: 1 model × 1 dataset × " \
           "60 treatments (1 control trial))" in result.out
    assert "lora_rank=19" in result.out and "lora_rank=20" not in result.out
    verbose = cli(*args, "--verbose", cwd=project.experiments)
    assert "lora_rank=60" in verbose.out and "more; --json" not in verbose.out
    as_json = cli(*args, "--json", cwd=project.experiments)
    assert len(json.loads(as_json.out)["trials"]) == 61


def store_rows(store, path: Path) -> dict[str, tuple]:
    """Per trial: its columns (less the row ids) and its sample and loss rows."""
    from sqlalchemy import select

    from cruijff.store import LossRow, SampleRow, TrialRow

    rows = {}
    with store.session() as session:
        for trial in session.scalars(select(TrialRow)):
            samples = sorted(tuple(r) for r in session.execute(
                select(SampleRow.sample_id, SampleRow.score).where(
                    SampleRow.trial_pk == trial.id)))
            losses = sorted(tuple(r) for r in session.execute(
                select(LossRow.step, LossRow.loss).where(LossRow.trial_pk == trial.id)))
            columns = {c: getattr(trial, c) for c in ("trial_id", "position", "label",
                                                      "eval_status", "metric", "source")}
            rows[trial.trial_id] = (columns, samples, losses)
    return rows


def test_a_filled_store_reads_only_the_trials_that_changed(tmp_path, monkeypatch):
    from results_support import SyntheticTrial, make_experiment

    import cruijff.store
    from cruijff.store import load_experiment_results, open_store, rebuild_experiment_results

    path = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", scores=[1, 0, 1], losses=[2.0, 1.5]),
        SyntheticTrial("b", scores=[0, 0, 1], control="a", treatment={"finetune.lr": 1}),
        SyntheticTrial("c", scores=[1, 1, 1], control="a", treatment={"finetune.lr": 2}),
    ])
    read: list[str] = []
    real = cruijff.store.read_logs
    monkeypatch.setattr(cruijff.store, "read_logs",
                        lambda paths: read.extend(p.parent.parent.parent.name for p in paths)
                        or real(paths))
    with open_store(None, path) as store:
        first = load_experiment_results(store, path)
        assert sorted(read) == ["trial-a", "trial-b", "trial-c"]
        rows = store_rows(store, path)
        read.clear()
        again = load_experiment_results(store, path)
        assert read == [] and store_rows(store, path) == rows
        assert (again.loaded, again.samples, again.losses) == \
               (first.loaded, first.samples, first.losses)

        # trial b's eval runs again: its record and log are written anew
        make_experiment(tmp_path / "other", [SyntheticTrial("b", scores=[1, 1, 1],
                                                            control="a")])
        for name in ("logs", ".cruijff"):
            target = path / "trial-b" / name
            shutil.rmtree(target)
            shutil.copytree(tmp_path / "other" / "trial-b" / name, target)
        load_experiment_results(store, path)
        assert read == ["trial-b"]
        changed = store_rows(store, path)
        assert changed["b"][1] != rows["b"][1] and changed["a"] == rows["a"]
        read.clear()
        rebuilt = rebuild_experiment_results(store, path)
        assert sorted(read) == ["trial-a", "trial-b", "trial-c"]
        assert store_rows(store, path) == changed and rebuilt.samples == 9
