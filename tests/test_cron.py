"""A cron expression is checked, with its reason, before a schedule is touched; what cruijff
accepts Prefect's CronSchedule accepts too, and the other way round."""

from __future__ import annotations

import pytest

from cruijff.cron import cron_problem

GOOD = ["*/5 * * * *", "0 3 * * *", "0 3 * * 1-5", "15,45 8-18/2 1 jan-jun sun",
         "0 0 1 */3 *", "0 22-2 * * *", "@daily", "@hourly", "59 23 31 12 7"]
BAD = {
    "bad": "it has 1 field; cron needs 5",
    "* * * *": "it has 4 fields",
    "61 * * * *": "minute field '61': 61 is outside 0-59",
    "0 24 * * *": "hour field '24': 24 is outside 0-23",
    "0 0 0 * *": "day of month field '0': 0 is outside 1-31",
    "0 0 * 13 *": "month field '13': 13 is outside 1-12",
    "0 0 * * 8": "day of week field '8': 8 is outside 0-7",
    "*/0 * * * *": "minute field '*/0': a step must be at least 1",
    "0 0 * foo *": "month field 'foo': 'foo' is not a month (1-12)",
    "0 0 * * ;rm": "day of week field ';rm' is not *, a number",
}


@pytest.mark.parametrize("expression", GOOD)
def test_good_expressions_pass_here_and_in_prefect(expression):
    from prefect.client.schemas.schedules import CronSchedule

    assert cron_problem(expression) is None
    CronSchedule(cron=expression)


@pytest.mark.parametrize("expression", sorted(BAD))
def test_bad_expressions_say_what_is_wrong_and_prefect_refuses_them_too(expression):
    from prefect.client.schemas.schedules import CronSchedule

    problem = cron_problem(expression)
    assert problem is not None and problem.startswith(BAD[expression]), problem
    with pytest.raises(ValueError):
        CronSchedule(cron=expression)


def test_a_bad_cron_is_refused_before_any_server_is_asked(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may start
    result = cli("schedule-reruns", tmp_path, "--cron", "0 24 * * *")
    assert result.code == 2
    assert result.err.strip() == ("error: --cron '0 24 * * *': hour field '24': 24 is outside "
                                  "0-23")
    assert not (tmp_path / "home").exists()
