"""`analyze`: numbers from the store, the report files, partial experiments (synthetic
experiments: real Inspect logs and stage records, nothing trained or evaluated)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from postgres_support import fresh_database, require_postgres
from results_support import SyntheticTrial, make_experiment, record_usage
from rich.console import Console

from cruijff.analysis import compare, holm, mean_estimate
from cruijff.errors import CruijffError
from cruijff.report import CSV_COLUMNS, analysis_table, analyze

A = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
B = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
C = [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0]
D = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0]


def ids(n: int) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def standard_trials() -> list[SyntheticTrial]:
    return [
        SyntheticTrial("a", scores=A, losses=[3.0, 2.0, 1.2, 0.7, 0.4]),
        SyntheticTrial("b", scores=B, control="a", treatment={"finetune.epochs": 3},
                       losses=[3.0, 1.5, 0.5, 0.1]),
        SyntheticTrial("c", scores=C, control="a", treatment={"use_fine_tune": False}),
        # scored on one sample fewer: pairs only on the common ids
        SyntheticTrial("d", scores=D[:-1], sample_ids=ids(11), control="a",
                       treatment={"finetune.lr": 0.1}, losses=[3.0, 2.5, 2.4]),
        SyntheticTrial("e", control="a", treatment={"eval.split": "nope"},
                       eval_status="failed"),
    ]


def by_id(values: list[float], sample_ids: list[str] | None = None) -> dict[str, float]:
    return dict(zip(sample_ids or ids(len(values)), map(float, values), strict=True))


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return {row["id"]: row for row in reader}


def close(text: str, expected: float) -> bool:
    return math.isclose(float(text), expected, rel_tol=1e-12, abs_tol=1e-15)


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    return make_experiment(tmp_path / "exp", standard_trials())


def test_csv_numbers_match_the_statistics(experiment: Path) -> None:
    analysis = analyze(experiment)
    rows = read_csv(experiment / "report" / "results.csv")
    assert list(rows) == ["a", "b", "c", "d", "e"]

    control = by_id(A)
    expected = {
        "b": compare(by_id(B), control),
        "c": compare(by_id(C), control),
        "d": compare(by_id(D[:-1], ids(11)), control),
    }
    adjusted = dict(zip(expected, holm([c.p_value for c in expected.values()]), strict=True))
    for trial_id, comparison in expected.items():
        row = rows[trial_id]
        assert close(row["diff_vs_control"], comparison.difference)
        assert close(row["diff_low"], comparison.low)
        assert close(row["diff_high"], comparison.high)
        assert close(row["p"], comparison.p_value)
        assert close(row["p_holm"], adjusted[trial_id])
        assert row["method"] == "mcnemar-exact" and row["control"] == "a"
        assert int(row["n_pairs"]) == comparison.n
    assert rows["d"]["n_pairs"] == "11" and rows["d"]["n"] == "11"

    for trial_id, scores in {"a": A, "b": B, "c": C}.items():
        estimate = mean_estimate([float(s) for s in scores])
        row = rows[trial_id]
        assert close(row["metric"], estimate.value)
        assert close(row["ci_low"], estimate.low) and close(row["ci_high"], estimate.high)
        assert row["n"] == "12" and row["ci_method"] == "wilson" and row["status"] == "ok"
    assert rows["a"]["diff_vs_control"] == "" and rows["a"]["control"] == ""

    # final loss from the loss log; wall time is the sum of the stage durations
    assert close(rows["a"]["final_loss"], 0.4) and close(rows["b"]["final_loss"], 0.1)
    assert rows["c"]["final_loss"] == ""
    assert close(rows["a"]["wall_s"], 5.0) and close(rows["c"]["wall_s"], 2.0)
    assert analysis.metric == "accuracy"
    assert [t.id for t in analysis.compared] == ["b", "c", "d"]


def test_partial_experiment_names_the_missing_trial(experiment: Path) -> None:
    analysis = analyze(experiment)
    assert [(m.id, m.reason) for m in analysis.missing] == [("e", "failed")]
    rows = read_csv(experiment / "report" / "results.csv")
    assert rows["e"]["status"] == "failed" and rows["e"]["metric"] == ""
    markdown = (experiment / "report" / "report.md").read_text()
    assert "## Trials without results" in markdown
    assert "e (eval.split=nope): failed" in markdown
    page = (experiment / "report" / "report.html").read_text()
    assert re.search(r'<ul id="missing"><li>e \(eval.split=nope\): failed', page)
    assert "4 of 5 trials have results." in markdown


def test_treatment_whose_control_failed_is_not_compared(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", eval_status="failed"),
        SyntheticTrial("b", scores=B, control="a", treatment={"x": 1}),
    ])
    analysis = analyze(experiment, formats={"csv"})
    b = analysis.trials[1]
    assert b.comparison is None and b.note == "control a has no results"
    assert [f.name for f in analysis.files] == ["results.csv"]
    assert not (experiment / "report" / "report.html").exists()


def test_no_results_at_all_is_an_error(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", eval_status="running"), SyntheticTrial("b", eval_status=None)])
    with pytest.raises(CruijffError, match=r"no results yet.*a \(control\): running"):
        analyze(experiment)


def test_unknown_format_and_not_an_experiment(experiment: Path, tmp_path: Path) -> None:
    with pytest.raises(CruijffError, match="unknown report format 'pdf'"):
        analyze(experiment, formats={"pdf", "csv"})
    with pytest.raises(CruijffError, match="not a cruijff experiment"):
        analyze(tmp_path)


def test_html_is_self_contained_with_its_plots(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    analysis = analyze(experiment, output=out)
    assert analysis.report_dir == out.resolve()
    page = (out / "report.html").read_text()
    assert not re.search(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "url(" not in page  # no fonts or images pulled in by CSS
    plots = re.findall(r'<svg class="plot" id="([a-z-]+)"', page)
    assert plots == ["metric-plot", "diff-plot", "loss-plot", "compute-plot"]
    metric, diff, loss, _ = (page.split(f'id="{p}"')[1].split("</svg>")[0] for p in plots)
    assert metric.count('class="point"') == 4  # a, b, c, d (e failed)
    assert metric.count('class="ci"') == 4
    assert diff.count('class="point"') == 3 and diff.count('class="zero"') == 1
    assert loss.count('class="loss-curve"') == 3  # a, b, d were fine-tuned
    assert re.findall(r'class="loss-curve" data-trial="(\w+)"', loss) == ["a", "b", "d"]


def test_labels_are_escaped(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", scores=A),
        SyntheticTrial("b", scores=B, control="a", treatment={"eval.p": "<script>x</script>"}),
    ])
    analyze(experiment, formats={"html"})
    page = (experiment / "report" / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_non_binary_scores_use_the_bootstrap(tmp_path: Path) -> None:
    a = [0.5, 0.25, 1.0, 0.75, 0.0, 0.5]
    b = [0.75, 0.5, 1.0, 1.0, 0.25, 0.75]
    experiment = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", scores=a),
        SyntheticTrial("b", scores=b, control="a", treatment={"x": 1}),
    ])
    analysis = analyze(experiment, formats={"csv"})
    assert analysis.metric == "mean score"
    row = read_csv(experiment / "report" / "results.csv")["b"]
    expected = compare(by_id(b), by_id(a))
    assert row["method"] == "paired-bootstrap" and close(row["p"], expected.p_value)
    assert close(row["diff_low"], expected.low)
    assert read_csv(experiment / "report" / "results.csv")["a"]["ci_method"] == "bootstrap"


def test_epochs_are_averaged_per_sample(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path / "exp", [SyntheticTrial("a", scores=A, epochs=3)])
    analysis = analyze(experiment, formats=set())
    estimate = analysis.trials[0].estimate
    assert estimate is not None and estimate.n == 12  # samples, not sample-epochs
    assert estimate.value == pytest.approx(sum(A) / 12)
    assert analysis.files == []


def test_json_and_table(experiment: Path) -> None:
    analysis = analyze(experiment, formats=set())
    data = json.loads(analysis.to_json())  # strict JSON: no NaN
    assert data["experiment"] == "exp" and data["metric"] == "accuracy"
    assert [t["id"] for t in data["trials"]] == ["a", "b", "c", "d", "e"]
    assert data["missing"] == [{"id": "e", "label": "eval.split=nope", "reason": "failed",
                                "detail": "ValueError: no split 'nope'"}]
    assert data["trials"][1]["vs_control"]["method"] == "mcnemar-exact"
    console = Console(record=True, width=200)
    console.print(analysis_table(analysis))
    text = console.export_text()
    assert "finetune.epochs=3" in text and "failed" in text and "(control)" in text


def test_analyze_on_postgresql_matches_sqlite(experiment: Path) -> None:
    require_postgres()
    analyze(experiment, output=experiment / "sqlite-report", formats={"csv"})
    with fresh_database("cruijff_report") as db:
        analysis = analyze(experiment, output=experiment / "pg-report", formats={"csv"},
                           database_url=db.url)
    assert analysis.store_url.startswith("postgresql+psycopg://")
    assert (experiment / "pg-report" / "results.csv").read_text() == (
        experiment / "sqlite-report" / "results.csv").read_text()


def test_prompt_opt_vs_fine_tune_vs_both_when_the_design_has_them(tmp_path):
    """The four arms of use_fine_tune x use_prompt_opt, each with its best trial."""
    from cruijff.report import analyze

    trials = [
        SyntheticTrial("a", [1] * 8 + [0] * 2, losses=[2.0, 1.0]),
        SyntheticTrial("b", [0] * 10, control="a", treatment={"use_fine_tune": False}),
        SyntheticTrial("c", [1] * 5 + [0] * 5, control="a", use_prompt_opt=True,
                       treatment={"use_fine_tune": False, "use_prompt_opt": True}),
        SyntheticTrial("d", [1] * 10, control="a", losses=[2.0, 0.5], use_prompt_opt=True,
                       treatment={"use_prompt_opt": True}),
    ]
    exp = make_experiment(tmp_path / "arms", trials)
    analysis = analyze(exp, formats={"md", "html"})
    markdown = (exp / "report" / "report.md").read_text()
    section = markdown.split("## Prompt optimization vs fine-tuning")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0].strip("| ") for r in rows[1:]] == [
        "base", "prompt-opt", "fine-tune", "both"]
    assert "0.500" in rows[2] and "1.000" in rows[4]
    assert 'id="arms"' in (exp / "report" / "report.html").read_text()
    assert {t.id: t.arm for t in analysis.trials} == {
        "a": "fine-tune", "b": "base", "c": "prompt-opt", "d": "both"}


def test_compute_table_plot_json_and_markdown(experiment: Path) -> None:
    """Chosen figures: a's fine-tune ran out of memory on Slurm, b's ran locally on a GPU;
    the other stages were not measured (only cruijff's clock)."""
    g = 1024
    record_usage(experiment / "trial-a", "finetune", outcome="OUT_OF_MEMORY",
                 usage={"wall_s": 240, "cpu_s": 400, "peak_rss_mib": 2.1 * g},
                 slurm={"job_id": "41", "state": "OUT_OF_MEMORY", "max_rss_mib": 2.0 * g,
                        "requested": {"mem_mib": 2 * g, "time_s": 1800}})
    record_usage(experiment / "trial-b", "finetune", usage={
        "wall_s": 90, "cpu_s": 85, "peak_rss_mib": 3174,
        "gpus": [{"device": "GPU-x", "peak_used_mib": 10240}],
        "throughput": {"tokens_per_s": 1234.4}})
    record_usage(experiment / "trial-b", "eval", usage={
        "wall_s": 12, "peak_rss_mib": 900, "throughput": {"samples_per_s": 2.5}},
        slurm={"job_id": "42", "requested": {"mem_mib": 8 * g, "time_s": 600}})
    analysis = analyze(experiment)

    rows = {(c.trial, c.stage): c for c in analysis.compute}
    assert list(rows) == [("a", "finetune"), ("a", "eval"), ("b", "finetune"), ("b", "eval"),
                          ("c", "eval"), ("d", "finetune"), ("d", "eval"), ("e", "eval")]
    assert rows["a", "finetune"].use.peak_rss_mib == pytest.approx(2.1 * g)
    assert rows["b", "eval"].use.mem_share == pytest.approx(900 / (8 * g))

    page = (experiment / "report" / "report.html").read_text()
    table = page.split('<table id="compute">')[1].split("</table>")[0]
    headers = re.findall(r"<th>([^<]*)</th>", table)
    assert headers == ["trial", "stage", "wall", "CPU", "peak RSS", "GPU peak", "asked",
                       "use %", "outcome", "throughput"]
    cells = {(m[0], m[1]): re.findall(r"<td>([^<]*)</td>", m[2]) for m in re.findall(
        r'<tr data-trial="(\w)" data-stage="(\w+)"[^>]*>(.*?)</tr>', table)}
    assert cells["a", "finetune"] == ["a", "finetune", "4m", "6m40s", "2.1G", "–",
                                      "2G · 30m", "mem 105% ▲ · time 13% ▽", "OUT_OF_MEMORY",
                                      "–"]
    assert cells["b", "finetune"] == ["b", "finetune", "1m30s", "1m25s", "3.1G", "10G", "–",
                                      "–", "done", "1234 tokens/s"]
    assert cells["b", "eval"][6:] == ["8G · 10m", "mem 11% ▽ · time 2% ▽", "done",
                                      "2.5 samples/s"]
    assert cells["a", "eval"][2:4] == ["2s", "–"]  # not measured: cruijff's clock only
    assert 'data-stage="finetune" data-outcome="OUT_OF_MEMORY"' in table

    plot = page.split('id="compute-plot"')[1].split("</svg>")[0]
    walls = re.findall(r'<rect class="wall" data-stage="(\w+)"', plot)
    assert len(walls) == 8  # every stage run with a wall time
    assert re.findall(r'<rect class="memory( oom)?" data-stage="(\w+)"', plot) == [
        (" oom", "finetune"), ("", "finetune")]  # a: out of memory; b: its fine-tune's peak
    assert plot.count('class="asked"') == 1  # a asked 2G; b's fine-tune asked nothing
    assert re.findall(r'<g class="legend">.*?>(\w+)</text>', plot) == ["finetune", "eval"]

    data = json.loads(analysis.to_json())
    first = data["compute"][0]
    assert (first["trial"], first["stage"], first["outcome"], first["asked_mem_mib"]) == (
        "a", "finetune", "OUT_OF_MEMORY", 2 * g)
    assert data["compute"][2]["throughput"] == {"tokens_per_s": 1234.4}
    markdown = (experiment / "report" / "report.md").read_text()
    section = markdown.split("## Compute")[1].split("## Methods")[0]
    assert "| a | finetune | 4m | 6m40s | 2.1G | – | 2G · 30m |" in section
    assert "▽ below 25%, ▲ above 90%" in section


def test_a_report_of_unmeasured_records_says_so(experiment: Path) -> None:
    analysis = analyze(experiment, formats={"md"})
    assert all(not c.use.measured for c in analysis.compute)
    markdown = (experiment / "report" / "report.md").read_text()
    assert "No stage attempt was measured" in markdown


def _as_built(experiment: Path) -> Path:
    """Give the synthetic trials the model and data paths a build writes, so that the
    experiment reads as a run reads it (runner.load_experiment)."""
    import yaml

    for config in experiment.glob("trial-*/config.yaml"):
        data = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**data, "model_path": str(experiment / "m"),
                                          "data_path": str(experiment / "d.json")}))
    return experiment


def test_a_trial_after_a_failed_fine_tune_is_blocked_as_summary_says(tmp_path: Path) -> None:
    from cruijff.runner import load_experiment, trial_states
    from cruijff.state import StageRecord, write_record

    experiment = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", scores=A),
        SyntheticTrial("b", control="a", treatment={"finetune.lr": 9}, losses=[1.0],
                       eval_status=None),
        SyntheticTrial("c", control="a", treatment={"eval.limit": 3}, eval_status=None),
    ])
    write_record(experiment / "trial-b", StageRecord("finetune", "k", "failed", error="boom"))
    _as_built(experiment)
    summary_words = {t.id: trial_states(t, t.stages, held=False)["eval"].state
                     for t in load_experiment(experiment).trials if t.id != "a"}
    analysis = analyze(experiment)
    assert [(t.id, t.status) for t in analysis.trials] == [("a", "ok"), ("b", "blocked"),
                                                           ("c", "pending")]
    assert summary_words == {"b": "blocked", "c": "pending"}
    assert [m.describe() for m in analysis.missing] == [
        "b (finetune.lr=9): blocked: finetune failed",
        "c (eval.limit=3): pending: no eval record yet"]
    assert read_csv(experiment / "report" / "results.csv")["b"]["status"] == "blocked"
    assert "b (finetune.lr=9): blocked: finetune failed" in (
        experiment / "report" / "report.md").read_text()


def test_a_reused_fine_tune_is_one_curve_named_in_the_legend(tmp_path: Path) -> None:
    experiment = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", scores=A, losses=[3.0, 2.0, 1.0, 0.5, 0.4, 0.3]),
        SyntheticTrial("b", scores=B, control="a", treatment={"eval.limit": 12},
                       finetune_reused_from="a"),
        SyntheticTrial("c", scores=C, control="a", treatment={"finetune.epochs": 1},
                       losses=[3.1, 2.2]),
    ])
    analysis = analyze(experiment, formats={"html"})
    assert analysis.trials[1].losses == analysis.trials[0].losses  # what the store holds
    assert analysis.to_dict()["trials"][1]["losses_from"] == "a"
    loss = (experiment / "report" / "report.html").read_text().split(
        'id="loss-plot"')[1].split("</svg>")[0]
    # a once (b's run is a's), the longer first so that the short c lies on top of it
    assert re.findall(r'class="loss-curve" data-trial="(\w+)"', loss) == ["a", "c"]
    assert 'data-reused-by="b"' in loss and "b: eval.limit=12 — reused from a" in loss
    assert len(re.findall(r'class="loss-marker"', loss)) == 6 + 2


def test_forest_plot_labels_are_whole_and_the_margin_holds_them(tmp_path: Path) -> None:
    from cruijff.report import _text_px

    label = {"finetune.model.lora_rank": 64, "dataset": "words_10L_80_1000.json"}
    experiment = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", scores=A), SyntheticTrial("b", scores=B, control="a",
                                                      treatment=label)])
    analyze(experiment, formats={"html"})
    page = (experiment / "report" / "report.html").read_text()
    for plot in ("metric-plot", "diff-plot"):
        svg = page.split(f'id="{plot}"')[1].split("</svg>")[0]
        shown = re.findall(r'<text class="label" x="([\d.]+)"[^>]*>([^<]*)</text>', svg)
        assert ("b: finetune.model.lora_rank=64, dataset=words_10L_80_1000.json"
                in [text for _, text in shown])  # whole: 61 characters
        assert all(float(x) >= _text_px(text) for x, text in shown)  # right-aligned at x


def test_stages_are_listed_in_the_order_they_run() -> None:
    from cruijff.summary import in_run_order

    assert in_run_order([["eval"], ["finetune", "eval"], ["prompt_opt", "eval"],
                         ["finetune", "prompt_opt", "eval"]]) == ["finetune", "prompt_opt",
                                                                   "eval"]
    assert in_run_order([["eval"], ["acme__score"], ["finetune", "acme__score"]]) == [
        "eval", "finetune", "acme__score"]
    assert in_run_order([]) == []
