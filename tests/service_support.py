"""Tests that need a service this machine may lack (Slurm, PostgreSQL, Chromium) skip on a
laptop, but fail in CI, which sets CRUIJFF_REQUIRE_<SERVICE>=1: a missing service there must
never pass silently."""

from __future__ import annotations

import os

import pytest


def require_service(name: str, reason: str | None, env_var: str, hint: str) -> None:
    """Skip the current test when `reason` says the service is unusable; fail if `env_var`=1."""
    if reason is None:
        return
    if os.environ.get(env_var) == "1":
        pytest.fail(f"{env_var}=1 but {name} is not usable here: {reason}; {hint}",
                    pytrace=False)
    pytest.skip(f"{name} is not running here ({reason}); {hint}")
