"""uv.lock holds what CI tests: `uv sync` installs the versions constraints-cpu.txt pins (the
ones pip gets with `-c constraints-cpu.txt`), for the dependencies pyproject.toml declares now.
When one of them changes, `uv lock` must be run again; this says so."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
RELOCK = "run `uv lock` in the repository and commit uv.lock"


def pins() -> dict[str, str]:
    """constraints-cpu.txt as {name: version}."""
    lines = (REPO / "constraints-cpu.txt").read_text().splitlines()
    pairs = (line.split("#")[0].strip().split("==") for line in lines)
    return {name.strip(): version.strip() for name, version in
            (pair for pair in pairs if len(pair) == 2)}


def spec(name: str, specifier: str) -> tuple[str, frozenset[str]]:
    return canonicalize_name(name), frozenset(map(str, SpecifierSet(specifier)))


def declared() -> set[tuple[str, frozenset[str]]]:
    """pyproject.toml's requirements, with extras' under their extra: (name, specifier)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"],
                    *(r for extra in project["optional-dependencies"].values() for r in extra)]
    parsed = map(Requirement, requirements)
    return {spec(r.name, str(r.specifier)) for r in parsed}


def test_uv_constrains_to_the_pins_ci_tests() -> None:
    uv = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]
    assert sorted(uv["constraint-dependencies"]) == sorted(f"{n}=={v}" for n, v in
                                                           pins().items())


def test_the_lock_is_of_the_declared_requirements_and_pins() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    constraints = {c["name"]: c["specifier"] for c in lock["manifest"]["constraints"]}
    assert constraints == {n: f"=={v}" for n, v in pins().items()}, RELOCK
    root = next(p for p in lock["package"] if p["name"] == "cruijff")
    locked = {spec(r["name"], r.get("specifier", "")) for r in root["metadata"]["requires-dist"]}
    assert locked == declared(), RELOCK
    versions = {p["name"]: p.get("version") for p in lock["package"]}
    assert {n: versions[n] for n in pins()} == pins(), RELOCK
