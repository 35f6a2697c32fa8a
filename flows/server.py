"""The persistent local Prefect server that cruijff starts on demand.

Prefect's ephemeral mode must never be used with Dask: every worker process would start its own
temporary server on one SQLite file ("database is locked"). So when no ``PREFECT_API_URL`` is
configured, cruijff starts ONE Prefect server in the background, listening on 127.0.0.1 only,
with its state under ``<home>/prefect``, and reuses it from later runs and other processes:

- ``prefect.db``   the SQLite database (unless a ``database_url`` is given)
- ``server.json``  pid, port and URL of the running server
- ``server.log``   the server's stdout and stderr
- ``server.lock``  serializes check-and-start / stop between processes

Only what is Prefect's is here (its command line and settings, where a configured API URL comes
from); starting, checking and stopping a background process is `cruijff.service`. This module
does not import prefect at import time (the CLI imports it for `cruijff server`); health checks
use urllib.
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cruijff import service
from cruijff.errors import CruijffError
from cruijff.service import Service
from cruijff.urls import mask_url, url_password

DEFAULT_HOST = "127.0.0.1"
DB_FILE = "prefect.db"
# lines (uvicorn's) that follow the cause of a failed start: the cause is the telling one
_LOG_NOISE = (
    "Server stopped!",
    "Application startup failed",
    "Waiting for application",
    "server process",
)
_CMDLINE_WORDS = ("prefect", "server")  # a pid in server.json running anything else is not ours
_EXPORTED: str | None = None  # the managed server's URL that ensure_api put in os.environ


@dataclass(frozen=True)
class ServerInfo:
    url: str  # API URL, e.g. "http://127.0.0.1:4242/api"
    ui_url: str  # e.g. "http://127.0.0.1:4242"
    pid: int | None  # None when the server is not ours (external PREFECT_API_URL)
    database: str  # where its data lives (path or a URL with the password masked)
    managed: bool  # True if cruijff started it


# ---------------------------------------------------------------------------------------------
# public API


def server_status(home: Path) -> ServerInfo | None:
    """The running managed server (healthy), or None. No side effects."""
    state = _service(home).read_state()
    if state is None or not _is_ours_and_alive(state):
        return None
    if not service.healthy(state["url"]):
        return None
    return _info(state)


def start_server(
    home: Path,
    *,
    database_url: str | None = None,
    port: int | None = None,
    host: str = DEFAULT_HOST,
    timeout: float = 90,
) -> ServerInfo:
    """Start the managed server if it is not already running (idempotent); wait until healthy.

    A running server is reused; explicitly asking for a different port, host or database than
    the running one has is an error (stop it first). A stale ``server.json`` (dead pid, or no
    healthy server on its port) is cleaned up and a new server started, on the same port when
    it is free.
    """
    svc = _service(home)
    svc.directory.mkdir(parents=True, exist_ok=True)
    database = _database_url(svc.directory, database_url)
    with svc.locked(timeout):
        state = svc.read_state()
        if state is not None and _is_ours_and_alive(state):
            if service.wait_healthy(state["url"], pid=state["pid"], timeout=min(timeout, 15)):
                _check_same(
                    state, host=host, port=port, database_url=database_url, database=database
                )
                return _info(state)
            service.terminate(state["pid"], timeout=10)  # alive but not answering: replace it
        chosen = service.choose_port(host, port, previous=state.get("port") if state else None)
        return _spawn(svc, host=host, port=chosen, database=database, timeout=timeout)


def stop_server(home: Path, timeout: float = 30) -> bool:
    """Stop the managed server; True if one was stopped."""
    svc = _service(home)
    if not svc.state_file.exists():
        return False
    with svc.locked(timeout):
        state = svc.read_state()
        if state is None:
            svc.remove_state()
            return False
        stopped = _is_ours_and_alive(state)
        if stopped:
            service.terminate(state["pid"], timeout=timeout)
        # Keep the file, without a pid, so the next start reuses the port (stable UI address).
        svc.write_state({**state, "pid": None, "create_time": None, "stopped_at": time.time()})
        return stopped


def ensure_api(home: Path, *, database_url: str | None = None) -> ServerInfo:
    """Make sure flows run against a real Prefect server (never the ephemeral one).

    If ``PREFECT_API_URL`` is set in the environment or in the active Prefect settings
    (profile, prefect.toml), check that it answers and use it. Otherwise start (or reuse) the
    managed server, on ``database_url`` (default: the ``server_database_url`` setting,
    ``CRUIJFF_SERVER_DATABASE_URL``; SQLite under the home when unset). Either way
    ``os.environ["PREFECT_API_URL"]`` is set (and ephemeral mode switched off), so this process
    and its children (Dask worker processes created afterwards) use the same server. Prefect's
    settings are refreshed if prefect is already imported.
    """
    from cruijff.settings import CruijffSettings

    database_url = database_url or CruijffSettings().server_database_url or None
    url = os.environ.get("PREFECT_API_URL", "").strip()
    source = "PREFECT_API_URL in the environment"
    if not url:
        url, source = _configured_api_url()
    if url:
        state = _service(home).read_state()
        ours = (state is not None and _same_url(url, state["url"])) or (
            _EXPORTED is not None and _same_url(url, _EXPORTED)
        )
        if ours:
            # Our own server, set by an earlier ensure_api here or in a parent process
            # (start_server checks that it runs on the database asked for, if any).
            info = server_status(home) if database_url is None else None
            info = info or start_server(home, database_url=database_url)
        else:
            _check_external(url, source)
            info = ServerInfo(
                url=url.rstrip("/"),
                ui_url=_ui_url_for(url),
                pid=None,
                database="(external server)",
                managed=False,
            )
    else:
        info = start_server(home, database_url=database_url)
    _export_api_url(info.url, managed=info.managed)
    return info


# ---------------------------------------------------------------------------------------------
# state on disk


def _state_dir(home: Path) -> Path:
    return Path(home).expanduser().resolve() / "prefect"


def _service(home: Path) -> Service:
    return Service(
        _state_dir(home),
        name="server",  # server.json, server.log, server.lock
        what="the Prefect server",
        required=("pid", "port", "url"),
    )


def _is_ours_and_alive(state: dict) -> bool:
    """The pid in server.json is still the Prefect server we started (not a reused pid)."""
    return service.is_ours_and_alive(state, must_contain=_CMDLINE_WORDS)


def _info(state: dict) -> ServerInfo:
    return ServerInfo(
        url=state["url"],
        ui_url=state["ui_url"],
        pid=int(state["pid"]),
        database=state.get("database", ""),
        managed=True,
    )


def _check_same(
    state: dict, *, host: str, port: int | None, database_url: str | None, database: str
) -> None:
    running = f"a cruijff Prefect server is already running at {state['ui_url']}"
    fix = "stop it first (cruijff server stop)"
    if port is not None and int(state["port"]) != port:
        raise CruijffError(f"{running} (port {state['port']}, not {port}); {fix}")
    if host != DEFAULT_HOST and state.get("host", DEFAULT_HOST) != host:
        raise CruijffError(f"{running} (host {state.get('host')}, not {host}); {fix}")
    if database_url is not None and state.get("database") != _display_database(database):
        raise CruijffError(
            f"{running} with database {state.get('database')}, not "
            f"{_display_database(database)}; {fix}"
        )


# ---------------------------------------------------------------------------------------------
# starting


def _spawn(svc: Service, *, host: str, port: int, database: str, timeout: float) -> ServerInfo:
    ui_url = f"http://{service.url_host(host)}:{port}"
    url = f"{ui_url}/api"
    # `prefect server start` in the foreground, plus a quick retry of writes SQLite refused
    argv = [sys.executable, "-m", "cruijff.flows.prefect_server", host, str(port)]
    pid, log_offset = svc.spawn(
        argv,
        env=_server_env(svc.directory, host, port, database),
        banner=f"starting Prefect server at {url}",
    )
    state = {
        "pid": pid,
        "create_time": service.create_time(pid),
        "host": host,
        "port": port,
        "url": url,
        "ui_url": ui_url,
        "database": _display_database(database),
        "prefect_home": str(svc.directory),
        "log": str(svc.log_file),
        "started_at": time.time(),
    }
    svc.write_state(state)  # written at once so a crash of this process leaves a trace
    if service.wait_healthy(url, pid=pid, timeout=timeout):
        return _info(state)
    alive = service.alive(pid)
    if alive:
        service.terminate(pid, timeout=10)
    svc.remove_state()
    last = service.last_log_line(
        svc.log_file, log_offset, secret=url_password(database), noise=_LOG_NOISE
    )
    why = f"did not answer within {timeout:g} s" if alive else "exited"
    raise CruijffError(
        f"the Prefect server {why}: {last or '(no output)'} (log: {svc.log_file})"
    )


def _server_env(sdir: Path, host: str, port: int, database: str) -> dict[str, str]:
    # Nothing of the user's Prefect configuration leaks in (another API URL, profile, database):
    # the managed server is configured here only.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(sdir),
        PREFECT_PROFILES_PATH=str(sdir / "profiles.toml"),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=database,
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",  # no access log line per API call
        DO_NOT_TRACK="1",  # SDK telemetry
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
        COLUMNS="200",  # rich wraps error messages at 80 columns when not on a terminal
    )
    return env


def _database_url(sdir: Path, database_url: str | None) -> str:
    if database_url:
        return database_url
    return f"sqlite+aiosqlite:///{sdir / DB_FILE}"


def _display_database(url: str) -> str:
    if url.startswith("sqlite") and ":///" in url:
        return url.split(":///", 1)[1]
    return mask_url(url)


def _same_url(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        return u.strip().rstrip("/").replace("://localhost:", "://127.0.0.1:")

    return norm(a) == norm(b)


def _ui_url_for(api_url: str) -> str:
    url = api_url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


# ---------------------------------------------------------------------------------------------
# ensure_api helpers


def _may_configure_api() -> bool:
    """Whether any file Prefect reads its settings from could set an API URL: the profiles
    file, prefect.toml, pyproject.toml's [tool.prefect], .env (in the working folder). When
    none does, Prefect's settings need not be imported to learn that none is set (~1 s: a
    `summary` with no server answering stays fast)."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    for path, mark in ((profiles.expanduser(), "PREFECT_API_URL"), (Path("prefect.toml"), ""),
                       (Path("pyproject.toml"), "tool.prefect"), (Path(".env"), "PREFECT_API")):
        try:
            if mark in path.read_text(encoding="utf-8", errors="replace"):
                return True
        except OSError:  # absent or unreadable: Prefect reads nothing from it either
            continue
    return False


def _configured_api_url() -> tuple[str, str]:
    """PREFECT_API_URL from Prefect's own settings (active profile, prefect.toml, .env)."""
    if not _may_configure_api():
        return "", ""
    from prefect.settings import Settings  # lazy: only when a file may set the URL

    settings = Settings()  # read afresh: Prefect's global settings are fixed at its import
    url = (settings.api.url or "").strip()
    if not url:
        return "", ""
    try:  # name the profile when that is where the URL comes from
        profiles = tomllib.loads(Path(settings.profiles_path).read_text())
        name = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
        if name and "PREFECT_API_URL" in profiles.get("profiles", {}).get(name, {}):
            return url, f"PREFECT_API_URL in the active Prefect profile '{name}'"
    except (OSError, TypeError, ValueError, AttributeError):
        pass
    return url, "PREFECT_API_URL in the Prefect settings (profile, prefect.toml or .env)"


def _check_external(url: str, source: str) -> None:
    shown = mask_url(url)
    if not url.startswith(("http://", "https://")):
        raise CruijffError(f"{source} is not an http(s) URL: {shown}")
    status, reason = service.health(url, timeout=5.0)
    if status is None:
        raise CruijffError(
            f"the Prefect server at {shown} ({source}) is unreachable ({reason}); start it, "
            "or unset PREFECT_API_URL to let cruijff run its own local server"
        )
    if status in (401, 403):
        return  # it answers; the Prefect client will authenticate
    if status != 200:
        hint = "" if url.rstrip("/").endswith("/api") else " (an API URL usually ends in /api)"
        raise CruijffError(
            f"the Prefect server at {shown} ({source}) answered HTTP {status} to its health "
            f"check{hint}"
        )


def _export_api_url(url: str, *, managed: bool) -> None:
    global _EXPORTED
    _EXPORTED = url
    os.environ["PREFECT_API_URL"] = url
    # Belt and braces: a process that somehow lost the URL fails loudly instead of starting a
    # temporary server of its own (Prefect's default profile enables that).
    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's SDK telemetry (cruijff.cli.main)
    if managed:  # it has no CSRF protection: each new client would ask for a token first
        os.environ.setdefault("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "false")
    # Prefect reads its settings once at import; refresh them if it is already imported.
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


def running_api(home: Path) -> str | None:
    """The API URL flows would use, if a server answers there now; starts nothing."""
    url = os.environ.get("PREFECT_API_URL", "").strip() or _configured_api_url()[0]
    if not url:
        info = server_status(home)
        return info.url if info else None
    return url.rstrip("/") if service.healthy(url) else None
