"""A Hugging Face token given through the environment is never written anywhere cruijff
writes: configs, scripts, records, logs, reports, the results store, the Prefect database."""

from __future__ import annotations

import pytest
from conftest import cruijff, make_site

pytestmark = pytest.mark.slow
TOKEN = "hf_cruijffTestSecret0123456789abcdefXYZ"


def test_the_token_appears_in_no_file_written_during_a_run(tmp_path, tiny_random_model,
                                                            prefect_env):
    from pathlib import Path

    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", tiny_random_model)
    env = dict(prefect_env, HF_TOKEN=TOKEN, HUGGING_FACE_HUB_TOKEN=TOKEN)
    result = cruijff("run", "--config-path", site / "config.yaml", "--root", site,
                     "--name", "secret", "--task", "capitalization",
                     "--dataset", "words_5L_80_1000.json", "--model",
                     "cruijff/tiny-llama-random", "--control", "torchtune.epochs=1",
                     "--control", "torchtune.max_steps_per_epoch=2", "--control", "eval.limit=2",
                     "--treatment", "use_fine_tune=false", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for command in (["summary", site / "secret"], ["analyze", site / "secret"]):
        assert cruijff(*command, env=env).returncode == 0
    assert TOKEN not in result.stdout + result.stderr

    home = Path(prefect_env["CRUIJFF_HOME"])
    scanned = 0
    for root in (site, home):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    assert scanned > 20 and any(home.rglob("prefect.db*"))
