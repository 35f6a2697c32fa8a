"""Test support for a real PostgreSQL (`bash scripts/postgres/start.sh`, as root).

    from postgres_support import requires_postgres, fresh_database, query

    @requires_postgres
    def test_something():
        with fresh_database() as db:          # a new role + database, dropped afterwards
            assert query(db.url, "SELECT 1") == [(1,)]

`requires_postgres` skips when PostgreSQL does not accept a login at `POSTGRES_URL`, unless
`CRUIJFF_REQUIRE_POSTGRES=1` (set by CI), in which case the test fails: a missing database can
never pass silently. Fixtures that need PostgreSQL call `require_postgres()` themselves (a
decorator only runs after the fixtures are set up).

`POSTGRES_URL` is the URL start.sh prints (override: CRUIJFF_TEST_POSTGRES_URL). Databases and
roles for a test are created as the `postgres` superuser through `runuser -u postgres -- psql`
when running as root (the Debian cluster start.sh makes), else as the URL's own role, which then
needs CREATEROLE and CREATEDB (e.g. the superuser of the docker-compose `postgres` service).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest
from service_support import require_service

from cruijff.urls import mask_url

DEFAULT_URL = "postgresql+asyncpg://prefect:prefect@127.0.0.1:5432/prefect"
POSTGRES_URL = os.environ.get("CRUIJFF_TEST_POSTGRES_URL") or DEFAULT_URL
START_HINT = "start it with: bash scripts/postgres/start.sh (as root)"

_unavailable: str | None = None  # a negative answer is remembered for the process


@dataclass(frozen=True)
class Database:
    name: str
    role: str
    password: str
    url: str  # postgresql+asyncpg://role:password@host:port/name (for Prefect)


def postgres_unavailable_reason() -> str | None:
    """None when a login at POSTGRES_URL works, else why not (in words)."""
    global _unavailable
    if _unavailable is None:
        _unavailable = _check_postgres()
    return _unavailable


def _check_postgres() -> str | None:
    try:
        import asyncpg  # noqa: F401  (a dependency of prefect)
    except ImportError:
        return "asyncpg is not installed"
    try:
        rows = query(POSTGRES_URL, "SELECT 1", timeout=5)
    except Exception as exc:  # refused, timeout, authentication, ...
        return f"no login at {mask_url(POSTGRES_URL)}: {type(exc).__name__}: {exc}"
    return None if rows == [(1,)] else f"unexpected answer to SELECT 1: {rows}"


def require_postgres() -> None:
    """Skip the current test when PostgreSQL is not usable; fail if CRUIJFF_REQUIRE_POSTGRES=1."""
    require_service("PostgreSQL", postgres_unavailable_reason(), "CRUIJFF_REQUIRE_POSTGRES",
                    START_HINT)


# ---------------------------------------------------------------------------------------------
# SQL


def query(url: str, sql: str, *args, timeout: float = 30) -> list[tuple]:
    """Run one statement at `url` (a SQLAlchemy or libpq URL) with asyncpg; rows as tuples."""
    import asyncpg

    async def run() -> list[tuple]:
        conn = await asyncpg.connect(_libpq_url(url), timeout=timeout)
        try:
            return [tuple(r) for r in await conn.fetch(sql, *args, timeout=timeout)]
        finally:
            await conn.close(timeout=timeout)

    return asyncio.run(run())


def admin_sql(sql: str) -> None:
    """Run `sql` as a role that may create roles and databases (see the module docstring)."""
    if os.geteuid() == 0 and shutil.which("runuser") and shutil.which("psql"):
        port = str(urlsplit(POSTGRES_URL).port or 5432)
        proc = subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-p", port, "-d", "postgres", "-c", sql],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
        if proc.returncode == 0:
            return
        raise RuntimeError(f"psql as postgres failed: {(proc.stderr or proc.stdout).strip()}")
    query(_with_database(POSTGRES_URL, "postgres"), sql)


@contextlib.contextmanager
def fresh_database(prefix: str = "prefect_test") -> Iterator[Database]:
    """A new role (random password) owning a new UTF-8 database; both dropped at the end."""
    require_postgres()
    token = secrets.token_hex(4)
    name, role = f"{prefix}_{token}", f"cruijff_test_{token}"
    password = f"pw-{secrets.token_hex(12)}"  # distinctive: tests grep files for it
    try:
        admin_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        admin_sql(f"CREATE DATABASE {name} OWNER {role} ENCODING 'UTF8' TEMPLATE template0")
    except Exception as exc:
        with contextlib.suppress(Exception):
            admin_sql(f"DROP ROLE IF EXISTS {role}")
        pytest.fail(f"cannot create a test database at {mask_url(POSTGRES_URL)}: {exc}",
                    pytrace=False)
    parts = urlsplit(POSTGRES_URL)
    url = urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.netloc.rsplit('@', 1)[-1]}",
                                    path=f"/{name}"))
    try:
        yield Database(name=name, role=role, password=password, url=url)
    finally:
        admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin_sql(f"DROP ROLE IF EXISTS {role}")


def _libpq_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))

