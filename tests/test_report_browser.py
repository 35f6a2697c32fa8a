"""report.html in a real browser: headless Chromium renders it offline, with its four plots.

Skipped when Chromium is not installed (`apt-get install -y chromium`), unless
CRUIJFF_REQUIRE_CHROMIUM=1 (set by CI), in which case the test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from results_support import SyntheticTrial, make_experiment, record_usage

from cruijff.report import analyze

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    message = "Chromium is not installed (apt-get install -y chromium)"
    if os.environ.get("CRUIJFF_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"CRUIJFF_REQUIRE_CHROMIUM=1 but {message}", pytrace=False)
    pytest.skip(message)


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", "--mute-audio",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, cwd=profile.parent,
    )


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
