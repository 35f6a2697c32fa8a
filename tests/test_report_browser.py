"""report.html in a real browser: headless Chromium renders it offline, with its four plots.

Skipped when Chromium is not installed (`apt-get install -y chromium`), unless
CRUIJFF_REQUIRE_CHROMIUM=1 (set by CI), in which case the test fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_support import chromium, run_chromium
from results_support import SyntheticTrial, make_experiment, record_usage

from cruijff.report import analyze


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str]:
    """(screenshot, DOM after rendering) of a report with 4 results, 3 comparisons, 2 curves,
    and a stage's compute figures."""
    binary = chromium()
    tmp = tmp_path_factory.mktemp("browser")
    experiment = make_experiment(tmp / "exp", [
        SyntheticTrial("a", scores=[1, 0, 1, 1, 0, 1, 1, 0] * 3, losses=[3.0, 2.0, 1.0, 0.5]),
        SyntheticTrial("b", scores=[1, 1, 1, 1, 0, 1, 1, 1] * 3, control="a",
                       treatment={"finetune.epochs": 3}, losses=[3.0, 1.0, 0.3, 0.1]),
        SyntheticTrial("c", scores=[0, 0, 1, 0, 0, 0, 0, 0] * 3, control="a",
                       treatment={"use_fine_tune": False}),
        SyntheticTrial("d", scores=[1, 0, 1, 1, 0, 1, 1, 1] * 3, control="a",
                       treatment={"eval.limit": 24}),
        SyntheticTrial("e", control="a", treatment={"eval.split": "nope"}, eval_status="failed"),
    ])
    record_usage(experiment / "trial-a", "finetune", usage={"wall_s": 240, "peak_rss_mib": 3174},
                 slurm={"job_id": "41", "requested": {"mem_mib": 8192, "time_s": 1800}})
    analysis = analyze(experiment, formats={"html"}, output=tmp / "report")
    page = analysis.files[0].as_uri()
    shot = tmp / "shot.png"
    done = run_chromium(binary, tmp / "profile-shot", f"--screenshot={shot}",
                        "--window-size=1200,2000", "--hide-scrollbars", page)
    assert shot.is_file(), f"no screenshot: {done.stderr[-2000:]}"
    dom = run_chromium(binary, tmp / "profile-dom", "--dump-dom", page)
    assert dom.returncode == 0 and "<svg" in dom.stdout, dom.stderr[-2000:]
    return shot, dom.stdout


def test_screenshot_is_not_blank(rendered: tuple[Path, str]) -> None:
    from PIL import Image

    shot, _ = rendered
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    histogram = image.convert("L").histogram()  # pixels per grey level 0..255
    non_white = sum(histogram[:235]) / sum(histogram)
    assert non_white > 0.01, f"only {non_white:.2%} of the page is drawn"
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, f"only {len(colours)} distinct colours: nothing rendered?"
    # the plots' own colours (blue intervals, red significant ones, curve colours) are there
    assert any(b > 150 and r < 100 for _, (r, _g, b) in colours)
    assert any(r > 180 and g < 80 and b < 80 for _, (r, g, b) in colours)


def test_dom_has_the_four_plots(rendered: tuple[Path, str]) -> None:
    _, dom = rendered
    plots = re.findall(r'<svg class="plot" id="([a-z-]+)"', dom)
    assert plots == ["metric-plot", "diff-plot", "loss-plot", "compute-plot"]
    metric, diff, loss, compute = (dom.split(f'id="{p}"')[1].split("</svg>")[0] for p in plots)
    assert len(re.findall(r'<circle class="point"', metric)) == 4
    assert len(re.findall(r'<line class="ci"', metric)) == 4
    assert len(re.findall(r'<circle class="point"', diff)) == 3
    assert len(re.findall(r'<line class="zero"', diff)) == 1
    assert len(re.findall(r'<polyline class="loss-curve"', loss)) == 2
    assert 'id="missing"' in dom and "e (eval.split=nope): failed" in dom
    assert len(re.findall(r"<tr class=", dom)) == 5
    assert len(re.findall(r'<rect class="wall"', compute)) == 7  # every stage run
    assert len(re.findall(r'<rect class="memory"', compute)) == 1
    assert len(re.findall(r'<line class="asked"', compute)) == 1
    assert len(re.findall(r'<tr data-trial="[^"]+" data-stage=', dom)) == 7  # compute rows
    assert 'id="scorer-metrics"' in dom  # every scorer's metrics, beside the headline


MEASURE = """<script>
const found = [];
for (const svg of document.querySelectorAll("svg.plot")) {
  const box = svg.getBoundingClientRect();
  for (const text of svg.querySelectorAll("text")) {
    const r = text.getBoundingClientRect();
    found.push({plot: svg.id, text: text.textContent, left: r.left - box.left,
                right: box.right - r.right, top: r.top - box.top, bottom: box.bottom - r.bottom,
                page_right: box.right});
  }
}
const pre = document.createElement("pre");
pre.id = "measured";
pre.textContent = JSON.stringify({texts: found, width: window.innerWidth,
                                  scroll: document.documentElement.scrollWidth});
document.body.appendChild(pre);
</script>"""
WIDE = "W" * 70  # the widest letters, past the label cut
LONG_LABELS = {"finetune.model.lora_rank": 64, "dataset": "words_10L_80_1000.json"}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, Path]:
    """(report.html, a copy that measures every plot text) of a report with long labels, a
    fine-tune reused by another trial, a short curve, a trial blocked by a failed fine-tune,
    and a base-model control listed before fine-tuned trials."""
    import yaml

    from cruijff.state import StageRecord, write_record

    chromium()
    tmp = tmp_path_factory.mktemp("layout")
    experiment = make_experiment(tmp / "exp", [
        SyntheticTrial("a", scores=[1, 0, 1, 1, 0, 1, 1, 0] * 3),
        SyntheticTrial("b", scores=[1, 1, 1, 1, 0, 1, 1, 1] * 3, control="a",
                       treatment=LONG_LABELS, losses=[3.0, 2.4, 1.9, 1.5, 1.2, 1.0, 0.9, 0.8]),
        SyntheticTrial("c", scores=[1, 1, 1, 0, 0, 1, 1, 1] * 3, control="a",
                       treatment={**LONG_LABELS, "eval.limit": 24}, finetune_reused_from="b"),
        SyntheticTrial("d", scores=[0, 1, 1, 1, 0, 1, 1, 1] * 3, control="a",
                       treatment={"tag": WIDE}, losses=[2.9, 2.0]),
        SyntheticTrial("e", control="a", treatment={"finetune.lr": 9.0}, losses=[1.0],
                       eval_status=None),
    ])
    write_record(experiment / "trial-e", StageRecord("finetune", "ft-key", "failed",
                                                     error="RuntimeError: diverged"))
    for trial in experiment.glob("trial-*/config.yaml"):  # as a build writes them
        config = yaml.safe_load(trial.read_text())
        trial.write_text(yaml.safe_dump({**config, "model_path": str(tmp / "model"),
                                         "data_path": str(tmp / "data.json")}))
    analysis = analyze(experiment, formats={"html"}, output=tmp / "report")
    page = analysis.files[0]
    measuring = tmp / "measure.html"
    measuring.write_text(page.read_text().replace("</body>", f"{MEASURE}</body>"))
    return page, measuring


def _measured(binary: str, measuring: Path, width: int) -> dict:
    import html
    import json

    done = run_chromium(binary, measuring.parent / f"profile-measure-{width}", "--dump-dom",
                        f"--window-size={width},3000", measuring.as_uri())
    found = re.search(r'<pre id="measured">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize("width", [480, 1600])
def test_every_plot_label_is_whole_inside_its_plot(layout, width) -> None:
    binary = chromium()
    page, measuring = layout
    shot = page.parent / f"report-{width}.png"
    run_chromium(binary, page.parent / f"profile-shot-{width}", f"--screenshot={shot}",
                 f"--window-size={width},3000", "--hide-scrollbars", page.as_uri())
    assert shot.is_file()
    measured = _measured(binary, measuring, width)
    texts = measured["texts"]
    labels = [t for t in texts if re.match(r"[a-e]: ", t["text"])]
    assert {t["plot"] for t in labels} == {"metric-plot", "diff-plot", "loss-plot",
                                           "compute-plot"}
    clipped = [t for t in texts if min(t["left"], t["right"], t["top"], t["bottom"]) < -0.5]
    assert clipped == [], clipped
    assert all(t["page_right"] <= measured["width"] + 0.5 for t in texts)  # no plot off-page
    assert measured["scroll"] <= measured["width"]  # the page itself never scrolls sideways
    cut = [t["text"] for t in labels if t["text"].startswith("d: ") and t["plot"] != "loss-plot"]
    assert len(cut) == 3 and all(x.endswith("…") for x in cut)  # its title holds it whole


def test_a_reused_fine_tune_is_drawn_once_and_named(layout) -> None:
    page, _ = layout
    text = page.read_text()
    loss = text.split('id="loss-plot"')[1].split("</svg>")[0]
    assert re.findall(r'<polyline class="loss-curve" data-trial="([a-z])"', loss) == ["b", "d"]
    assert 'data-reused-by="c"' in loss and "c: " in loss and "— reused from b" in loss
    assert len(re.findall(r'<circle class="loss-marker"', loss)) == 8 + 2  # short: marked


def test_the_report_uses_summarys_state_words_and_run_order(layout) -> None:
    page, _ = layout
    text = page.read_text()
    assert "e (finetune.lr=9.0): blocked: finetune failed" in text
    assert "pending" not in text
    compute = text.split('id="compute-plot"')[1].split("</svg>")[0]
    legend = re.findall(r'<g class="legend"><rect[^>]*/><text[^>]*>([a-z_]+)</text>', compute)
    assert legend == ["finetune", "eval"]  # the control (eval only) is listed first
