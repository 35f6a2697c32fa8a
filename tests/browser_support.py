"""Headless Chromium for the tests that look at a page as a researcher would (the analyze
report, the Prefect UI). Skipped when Chromium is not installed (`apt-get install -y
chromium`), unless CRUIJFF_REQUIRE_CHROMIUM=1 (set by CI), in which case the test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
