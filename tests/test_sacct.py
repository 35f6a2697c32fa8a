"""sacct's view of a stage attempt (cruijff/sacct.py): parsers, matching a step to its attempt,
the fallbacks, the outcome of a failed attempt, the srun step a stage runs as; and on the real
single-node Slurm (scripts/slurm/start.sh with slurmdbd), a step over its memory and a normal
one."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from slurm_support import require_slurm_accounting, requires_slurm, sbatch, wait_for_job

from cruijff.errors import CruijffError
from cruijff.sacct import (
    classify,
    parse_duration,
    parse_memory_mib,
    parse_tres,
    state_word,
    step_accounting,
    step_name,
    step_prefix,
    tres_request,
)
from cruijff.state import SlurmAccounting

# ---------------------------------------------------------------- parsers


@pytest.mark.parametrize(("text", "seconds"), [
    ("00:00:05", 5), ("01:02:03", 3723), ("2-00:00:01", 172801),   # Elapsed, Timelimit
    ("00:01.234", 1.234), ("12:34", 754), ("01:02:03.5", 3723.5),  # TotalCPU
    ("1-01:00:00.250", 90000.25), ("00:00:00", 0),
])
def test_durations_are_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "UNLIMITED", "Partition_Limit", "INVALID", "5"])
def test_a_duration_sacct_does_not_give_is_none(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize(("text", "mib"), [
    ("1536000K", 1500.0), ("4.5M", 4.5), ("2G", 2048.0), ("1T", 1024.0 ** 2), ("0", 0.0),
    ("1048576", 1.0), ("512k", 0.5),
])
def test_memory_is_read_in_mib_with_slurms_powers_of_1024(text, mib):
    assert parse_memory_mib(text) == mib


@pytest.mark.parametrize("text", ["", "n/a", "1.5X"])
def test_memory_sacct_does_not_give_is_none(text):
    assert parse_memory_mib(text) is None


def test_alloc_tres_is_read_into_a_request():
    tres = "billing=2,cpu=2,gres/gpu=1,mem=1024M,node=1"
    assert parse_tres(tres)["gres/gpu"] == "1"
    assert tres_request(tres, "00:30:00") == {"mem_mib": 1024, "cpus": 2, "gpus": 1,
                                              "time_s": 1800}
    assert tres_request("", "UNLIMITED") == {}
    assert all(isinstance(v, int) for v in tres_request(tres, "00:30:00").values())


@pytest.mark.parametrize(("text", "word"), [
    ("CANCELLED by 0", "CANCELLED"), ("OUT_OF_MEMORY", "OUT_OF_MEMORY"),
    ("CANCELLED+", "CANCELLED"), ("", None),
])
def test_a_state_is_its_first_word(text, word):
    assert state_word(text) == word


# ---------------------------------------------------------------- step_accounting, on fixtures

FIELDS = "JobID|JobName|State|ExitCode|Elapsed|TotalCPU|MaxRSS|AllocTRES|Timelimit"
JOB = ("41|cruijff-exp-profile0|RUNNING|0:0|00:01:10|00:09.000||"
       "billing=1,cpu=1,mem=1024M,node=1|00:30:00")
# As Slurm 22.05 with OverMemoryKill writes a step it killed for its memory (--noconvert:
# MaxRSS in bytes); with the cgroup OOM killer the State is OUT_OF_MEMORY instead.
STEP_OOM = ("41.3|cruijff:exp:t1:finetune:a1|CANCELLED by 0|0:9|00:00:02|00:00.950|1621647360|"
            "cpu=1,gres/gpu=2,mem=1024M,node=1|")
STEP_RUNNING = ("41.3|cruijff:exp:t1:finetune:a1|RUNNING|0:0|00:00:02|00:00:00||"
                "cpu=1,mem=1024M,node=1|")
STEP_DONE = ("41.4|cruijff:exp:t1:eval:a1|COMPLETED|0:0|00:00:01|00:00.512|10240K|"
             "cpu=1,mem=1024M,node=1|")


@pytest.fixture
def fake_sacct(tmp_path, monkeypatch):
    """A `sacct` on PATH that answers its calls, in turn, with the given outputs (the last one
    again after that); an answer `!text` fails with `text` on stderr. Returns the call log."""
    folder = tmp_path / "bin"
    folder.mkdir()
    calls = tmp_path / "calls.jsonl"

    def install(*answers: str, squeue: str = "") -> Path:
        (tmp_path / "answers.json").write_text(json.dumps(list(answers)))
        for name, body in (("sacct", f"""
                import json, sys
                from pathlib import Path
                calls = Path({str(calls)!r})
                done = len(calls.read_text().splitlines()) if calls.exists() else 0
                with calls.open("a") as f:
                    f.write(json.dumps(sys.argv[1:]) + "\\n")
                answers = json.loads(Path({str(tmp_path / "answers.json")!r}).read_text())
                answer = answers[min(done, len(answers) - 1)]
                if answer.startswith("!"):
                    sys.stderr.write(answer[1:] + "\\n")
                    sys.exit(1)
                sys.stdout.write(answer)
                """), ("squeue", f"""
                import sys
                sys.stdout.write({squeue!r})
                """)):
            script = folder / name
            script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
            script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        return calls

    return install


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_step_over_its_memory_is_read_with_its_figures(fake_sacct):
    calls = fake_sacct(f"{JOB}\n{STEP_OOM}\n")

    got = step_accounting("41", "3", "cruijff:exp:t1:finetune:a1", requested={"mem_mib": 1024},
                          wait_s=5, poll_s=0.01)

    assert got == SlurmAccounting(
        job_id="41", step_id="3", step_name="cruijff:exp:t1:finetune:a1",
        requested={"mem_mib": 1024, "cpus": 1, "time_s": 1800}, state="CANCELLED",
        job_state="RUNNING", exit_code="0:9", elapsed_s=2, total_cpu_s=0.95,
        max_rss_mib=1546.523, alloc_tres="cpu=1,gres/gpu=2,mem=1024M,node=1", source="sacct",
        note=None)
    [args] = _calls(calls)
    assert args[args.index("-j") + 1] == "41.3,41"
    assert "--noconvert" in args and "-c" not in args
    assert args[args.index("-o") + 1] == FIELDS.replace("|", ",")


def test_a_running_step_is_asked_again_until_its_state_is_final(fake_sacct):
    running, over = f"{JOB}\n{STEP_RUNNING}\n", f"{JOB}\n{STEP_OOM}\n"
    calls = fake_sacct(running, running, over)

    got = step_accounting("41", "3", "cruijff:exp:t1:finetune:a1", wait_s=30, poll_s=0.01)

    assert (got.state, got.max_rss_mib, got.note) == ("CANCELLED", 1546.523, None)
    assert len(_calls(calls)) == 3


def test_a_step_not_final_in_time_keeps_what_sacct_said_and_says_so(fake_sacct):
    fake_sacct(f"{JOB}\n{STEP_RUNNING}\n")

    got = step_accounting("41", "3", "cruijff:exp:t1:finetune:a1", wait_s=0)

    assert (got.state, got.source) == ("RUNNING", "sacct")
    assert got.note == "step still RUNNING in sacct after 0 s"


def test_a_step_of_another_name_is_not_the_attempts(fake_sacct):
    calls = fake_sacct(f"{JOB}\n{STEP_OOM}\n")

    got = step_accounting("41", "3", "cruijff:exp:t2:finetune:a1", wait_s=60, poll_s=0.01)

    assert (got.state, got.max_rss_mib, got.total_cpu_s) == (None, None, None)
    assert got.job_state == "RUNNING"
    assert "named 'cruijff:exp:t1:finetune:a1' in sacct" in got.note
    assert len(_calls(calls)) == 1  # a name never changes: not asked again


def test_without_a_step_id_the_newest_step_of_the_name_is_the_attempts(fake_sacct):
    older = STEP_DONE.replace("41.4|", "41.2|").replace("00:00.512", "00:07.000")
    other = STEP_OOM.replace("41.3|", "41.5|").replace("finetune:a1", "finetune:a2")
    calls = fake_sacct("\n".join([JOB, "41.batch|batch|RUNNING|0:0|00:01:10|00:01.000|90000K|"
                                  "cpu=1,mem=1024M,node=1|", older, STEP_OOM, STEP_DONE, other])
                       + "\n")

    got = step_accounting("41", None, "cruijff:exp:t1:eval:a1", wait_s=0)

    assert (got.step_id, got.state, got.total_cpu_s, got.max_rss_mib) == ("4", "COMPLETED",
                                                                          0.512, 10.0)
    [args] = _calls(calls)
    assert args[args.index("-j") + 1] == "41"


def test_a_step_not_in_sacct_yet_is_said(fake_sacct):
    fake_sacct(f"{JOB}\n")
    assert step_accounting("41", "3", "x", wait_s=0).note == "step 41.3 is not in sacct (yet)"
    assert step_accounting("41", None, "x", wait_s=0).note == (
        "no step named 'x' in job 41 in sacct (yet)")


def test_the_whole_job_is_read_when_no_step_is_named(fake_sacct):
    fake_sacct(JOB.replace("RUNNING", "TIMEOUT") + "\n")

    got = step_accounting("41", None, None, wait_s=0)

    assert (got.state, got.job_state, got.elapsed_s, got.max_rss_mib) == ("TIMEOUT", "TIMEOUT",
                                                                           70, None)
    assert "the whole job's figures" in got.note


DISABLED = "!Slurm accounting storage is disabled"
COMPLETION = "41|cruijff-exp-profile0|CANCELLED by 0|0:15|00:01:10|30|1"  # Timelimit: minutes


def test_without_slurmdbd_the_job_completion_log_gives_the_job(fake_sacct):
    calls = fake_sacct(DISABLED, COMPLETION + "\n")

    got = step_accounting("41", "3", "cruijff:exp:t1:finetune:a1", requested={"mem_mib": 1024},
                          wait_s=0)

    assert (got.source, got.state, got.job_state, got.elapsed_s) == ("sacct -c", None,
                                                                      "CANCELLED", None)
    assert (got.step_id, got.max_rss_mib, got.total_cpu_s, got.alloc_tres) == ("3", None, None,
                                                                                None)
    assert got.requested == {"mem_mib": 1024, "cpus": 1, "time_s": 1800}
    assert got.note.startswith("job-level only, from the job completion log (sacct failed: "
                               "Slurm accounting storage is disabled)")
    assert _calls(calls)[1][:2] == ["-c", "-n"]
    assert "AllocTRES" not in _calls(calls)[1][-1]  # sacct -c crashes on it


def test_without_slurmdbd_a_whole_job_is_read_from_the_job_completion_log(fake_sacct):
    fake_sacct(DISABLED, COMPLETION + "\n")

    got = step_accounting("41", None, None, wait_s=0)

    assert (got.source, got.state, got.exit_code, got.elapsed_s) == ("sacct -c", "CANCELLED",
                                                                      "0:15", 70)


def test_a_job_still_running_has_no_completion_line_and_is_not_waited_for(fake_sacct):
    calls = fake_sacct(DISABLED, "", squeue="RUNNING\n")

    got = step_accounting("41", "3", "x", wait_s=60, poll_s=0.01)

    assert (got.source, got.state) == ("none", None)
    assert "has no line in the job completion log" in got.note
    assert len(_calls(calls)) == 2


def test_a_sacct_that_fails_both_ways_is_a_note_not_an_error(fake_sacct):
    fake_sacct("!sacct: error: Problem talking to the database: Connection refused")

    got = step_accounting("41", "3", "x", wait_s=0)

    assert got.source == "none"
    assert got.note.count("Connection refused") == 2


def test_no_sacct_here_is_a_note(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    got = step_accounting("41", "3", "x", requested={"mem_mib": 2048}, wait_s=5)
    assert (got.source, got.note, got.requested) == ("none", "no sacct here", {"mem_mib": 2048})


def test_a_job_id_that_is_not_one_is_a_note(fake_sacct):
    calls = fake_sacct(JOB)
    assert step_accounting("local", None, None).note == "'local' is not a Slurm job id"
    assert not calls.exists()


# ---------------------------------------------------------------- classify


def _acct(state=None, job_state=None):
    return SlurmAccounting(job_id="41", step_id="3", state=state, job_state=job_state,
                           source="sacct")


OVER_MEMORY = """slurmstepd-vm: error: StepId=41.3 exceeded memory limit (1621647360 > 1073741824), being killed
slurmstepd-vm: error: Exceeded job memory limit
slurmstepd-vm: error: *** STEP 41.3 ON vm CANCELLED AT 2026-12-02T11:00:48 ***
srun: error: vm: task 0: Killed"""  # noqa: E501 (as Slurm 22.05 writes it)
TIME_LIMIT = ("slurmstepd: error: *** STEP 41.3 ON vm CANCELLED AT 2025-01-01T10:00:00 "
              "DUE TO TIME LIMIT ***")


@pytest.mark.parametrize(("state", "job_state", "log", "outcome"), [
    ("OUT_OF_MEMORY", "RUNNING", "", "OUT_OF_MEMORY"),
    ("CANCELLED", "RUNNING", OVER_MEMORY, "OUT_OF_MEMORY"),
    ("FAILED", "RUNNING", "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=41.3",
     "OUT_OF_MEMORY"),
    ("FAILED", "RUNNING", "slurmstepd: error: Exceeded job memory limit", "OUT_OF_MEMORY"),
    (None, None, OVER_MEMORY, "OUT_OF_MEMORY"),  # no sacct: the log's word
    ("TIMEOUT", "TIMEOUT", "", "TIMEOUT"),
    ("CANCELLED", "TIMEOUT", "", "TIMEOUT"),      # the worker job's time ran out
    ("CANCELLED", "RUNNING", TIME_LIMIT, "TIMEOUT"),
    ("DEADLINE", None, "", "TIMEOUT"),
    ("NODE_FAIL", None, "", "NODE_FAIL"),
    ("CANCELLED", "PREEMPTED", "", "PREEMPTED"),
    ("CANCELLED", "RUNNING", "", "CANCELLED"),
    ("FAILED", "RUNNING", "Traceback ...\nValueError: bad", None),
    ("FAILED", "TIMEOUT", "", None),               # it failed on its own before the job's end
    ("FAILED", "RUNNING", "torch.OutOfMemoryError: CUDA out of memory", None),  # not Slurm's
    ("COMPLETED", "RUNNING", "slurmstepd: error: Exceeded step memory limit at some point.", None),
    (None, None, "", None),
])
def test_a_failed_attempt_is_classified_by_sacct_then_its_log(state, job_state, log, outcome):
    assert classify(_acct(state, job_state), log) == outcome


def test_classify_without_accounting_reads_the_log():
    assert classify(None, TIME_LIMIT) == "TIMEOUT"
    assert classify(None, "") is None


# ---------------------------------------------------------------- step_prefix


def test_a_stage_runs_as_its_own_step_inside_a_worker_job(monkeypatch, tmp_path):
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("CRUIJFF_STAGE_STEP", "1")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")

    assert step_prefix("cruijff:exp:t1:finetune:a2") == [
        "srun", "--ntasks=1", "--nodes=1", "--cpus-per-task=4", "--overlap",
        "--job-name=cruijff:exp:t1:finetune:a2", "--kill-on-bad-exit=1", "--quiet", "--"]
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert "--cpus-per-task=4" not in step_prefix("a")
    monkeypatch.setenv("CRUIJFF_STAGE_STEP", "0")
    assert step_prefix("a") == []
    monkeypatch.setenv("CRUIJFF_STAGE_STEP", "1")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert step_prefix("a") == []


@pytest.mark.parametrize("name", ["", "a b", "a;b", "a|b", "a,b", "x" * 201, "é"])
def test_an_unsafe_step_name_is_refused(name):
    with pytest.raises(CruijffError, match="step name"):
        step_prefix(name)


def test_a_step_name_from_parts_is_always_safe():
    name = step_name("cruijff", "my exp", "trial|1", "finetune", "a2")
    assert name == "cruijff:my_exp:trial_1:finetune:a2"
    assert step_prefix(name) is not None  # accepted
    assert len(step_name("x" * 300)) == 200


# ---------------------------------------------------------------- on the real Slurm

STEPS_DRIVER = """
import json, os, subprocess, sys
from pathlib import Path
from cruijff.sacct import step_prefix

out = Path(sys.argv[1])
os.environ["CRUIJFF_STAGE_STEP"] = "1"  # as the worker job's prologue sets it
OVER = ("import os, sys, time; open(sys.argv[1], 'w').write(os.environ['SLURM_STEP_ID']); "
        "block = b'\\\\1' * (1536 * 1024 * 1024); time.sleep(60)")
NORMAL = ("import os, sys, time; open(sys.argv[1], 'w').write(os.environ['SLURM_STEP_ID']); "
          "block = b'\\\\1' * (64 * 1024 * 1024); sum(range(10 ** 7)); time.sleep(2)")
results = {}
for name, code in (("cruijff:test:over:a1", OVER), ("cruijff:test:normal:a1", NORMAL)):
    prefix = step_prefix(name)
    with (out / f"{name}.log").open("w") as log:
        rc = subprocess.run([*prefix, sys.executable, "-c", code, str(out / f"{name}.step")],
                            stdout=log, stderr=subprocess.STDOUT).returncode
    results[name] = {"prefix": prefix, "rc": rc}
(out / "results.json").write_text(json.dumps(results))
"""


@pytest.mark.slurm
@requires_slurm
def test_on_slurm_a_step_over_its_memory_is_out_of_memory_and_the_next_step_runs(tmp_path):
    require_slurm_accounting()
    driver = tmp_path / "driver.py"
    driver.write_text(STEPS_DRIVER)
    job = sbatch(["--mem=1G", "--time=00:05:00", "--job-name=cruijff-test-steps",
                  f"--output={tmp_path}/job.out", f"--wrap={sys.executable} {driver} {tmp_path}"],
                 cwd=tmp_path)
    assert wait_for_job(job, timeout=180).state == "COMPLETED", (tmp_path / "job.out").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(r["prefix"][0] == "srun" for r in results.values()), results

    name = "cruijff:test:over:a1"
    step = (tmp_path / f"{name}.step").read_text()
    over = step_accounting(str(job), step, name, requested={"mem_mib": 1024}, wait_s=30)
    log = (tmp_path / f"{name}.log").read_text()
    assert results[name]["rc"] != 0, log
    assert (over.source, over.step_id, over.step_name) == ("sacct", step, name), over
    assert classify(over, log) == "OUT_OF_MEMORY", (over, log)
    assert over.max_rss_mib >= 1000, over

    name = "cruijff:test:normal:a1"
    step = (tmp_path / f"{name}.step").read_text()
    normal = step_accounting(str(job), None, name, wait_s=30)  # found by its name
    assert results[name]["rc"] == 0, (tmp_path / f"{name}.log").read_text()
    assert (normal.job_id, normal.step_id, normal.state) == (str(job), step, "COMPLETED"), normal
    assert int(step) > int(over.step_id)
    assert normal.max_rss_mib >= 64 and normal.total_cpu_s > 0, normal
    assert normal.elapsed_s is not None and normal.requested.get("mem_mib") == 1024, normal
    assert classify(normal, "") is None


def test_a_job_squeue_lists_as_completing_shows_how_it_ended(fake_sacct):
    """A cancelled job stays in squeue as COMPLETING while its node cleans up, after sacct
    already says CANCELLED: summary shows CANCELLED. Fake sacct/squeue stand in for Slurm's
    timing, which a real cluster shows only now and then (tests/test_slurm_run.py met it)."""
    from cruijff.slurm import job_states

    fake_sacct("161|CANCELLED by 0\n162|RUNNING\n",
               squeue="161|COMPLETING\n162|COMPLETING\n163|PENDING\n")
    assert job_states(["161", "162", "163"]) == {
        "161": "CANCELLED", "162": "COMPLETING", "163": "PENDING"}
