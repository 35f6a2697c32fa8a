"""The persistent local Prefect server that cruijff starts on demand.

Prefect's ephemeral mode must never be used with Dask: every worker process would start its own
temporary server on one SQLite file ("database is locked"). So when no ``PREFECT_API_URL`` is
configured, cruijff starts ONE Prefect server in the background, listening on 127.0.0.1 only,
with its state under ``<home>/prefect``, and reuses it from later runs and other processes:

- ``prefect.db``   the SQLite database (unless a ``database_url`` is given)
- ``server.json``  pid, port and URL of the running server
- ``server.log``   the server's stdout and stderr
- ``server.lock``  serializes check-and-start / stop between processes

This module does not import prefect at import time (the CLI imports it for `cruijff server`);
health checks use urllib.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cruijff.errors import CruijffError
from cruijff.fileio import lock_within

DEFAULT_HOST = "127.0.0.1"
STATE_FILE = "server.json"
LOG_FILE = "server.log"
LOCK_FILE = "server.lock"
DB_FILE = "prefect.db"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")
_LOG_NOISE = (
    "Server stopped!",
    "Application startup failed",
    "Waiting for application",
    "server process",
)
_EXPORTED: str | None = None  # the managed server's URL that ensure_api put in os.environ

# Started by a short-lived launcher so the server is nobody's child here: no zombie and no
# "subprocess still running" warning in the (long-lived) cruijff process, and it outlives it.
_LAUNCHER = """\
import subprocess, sys
log = open(sys.argv[1], "ab")
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
print(proc.pid, flush=True)
proc.returncode = 0  # detached on purpose: do not warn that it is still running
"""


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
    state = _read_state(_state_dir(home))
    if state is None or not _is_ours_and_alive(state):
        return None
    if not _healthy(state["url"]):
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
    sdir = _state_dir(home)
    sdir.mkdir(parents=True, exist_ok=True)
    database = _database_url(sdir, database_url)
    with _locked(sdir, timeout):
        state = _read_state(sdir)
        if state is not None and _is_ours_and_alive(state):
            if _wait_healthy(state["url"], pid=state["pid"], timeout=min(timeout, 15)):
                _check_same(
                    state, host=host, port=port, database_url=database_url, database=database
                )
                return _info(state)
            _terminate(state["pid"], timeout=10)  # alive but not answering: replace it
        chosen = _choose_port(host, port, previous=state.get("port") if state else None)
        return _spawn(sdir, host=host, port=chosen, database=database, timeout=timeout)


def stop_server(home: Path, timeout: float = 30) -> bool:
    """Stop the managed server; True if one was stopped."""
    sdir = _state_dir(home)
    if not (sdir / STATE_FILE).exists():
        return False
    with _locked(sdir, timeout):
        state = _read_state(sdir)
        if state is None:
            (sdir / STATE_FILE).unlink(missing_ok=True)
            return False
        stopped = _is_ours_and_alive(state)
        if stopped:
            _terminate(state["pid"], timeout=timeout)
        # Keep the file, without a pid, so the next start reuses the port (stable UI address).
        _write_state(sdir, {**state, "pid": None, "create_time": None, "stopped_at": time.time()})
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

    sdir = _state_dir(home)
    database_url = database_url or CruijffSettings().server_database_url or None
    url = os.environ.get("PREFECT_API_URL", "").strip()
    source = "PREFECT_API_URL in the environment"
    if not url:
        url, source = _configured_api_url()
    if url:
        state = _read_state(sdir)
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
    _export_api_url(info.url)
    return info


# ---------------------------------------------------------------------------------------------
# state on disk


def _state_dir(home: Path) -> Path:
    return Path(home).expanduser().resolve() / "prefect"


def _read_state(sdir: Path) -> dict | None:
    try:
        state = json.loads((sdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not {"pid", "port", "url"} <= state.keys():
        return None
    return state


def _write_state(sdir: Path, state: dict) -> None:
    tmp = sdir / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, sdir / STATE_FILE)


@contextlib.contextmanager
def _locked(sdir: Path, timeout: float) -> Iterator[None]:
    sdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            lock_within(fd, max(timeout, 1) + 30)
        except BlockingIOError:
            raise CruijffError(
                f"another cruijff process holds {sdir / LOCK_FILE} (starting or "
                "stopping the Prefect server); try again when it is done"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


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
# starting and stopping


def _spawn(sdir: Path, *, host: str, port: int, database: str, timeout: float) -> ServerInfo:
    log = sdir / LOG_FILE
    _rotate(log)
    url_host = _url_host(host)
    ui_url = f"http://{url_host}:{port}"
    url = f"{ui_url}/api"
    with log.open("ab") as fh:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        fh.write(f"--- {stamp} cruijff: starting Prefect server at {url} ---\n".encode())
        log_offset = fh.tell()
    argv = [*_prefect_command(), "server", "start", "--host", host, "--port", str(port)]
    try:
        launched = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(log), *argv],
            cwd=sdir,  # no prefect.toml / .env from the user's working directory
            env=_server_env(sdir, host, port, database),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        pid = int(launched.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise CruijffError(f"could not launch the Prefect server: {exc}") from exc
    state = {
        "pid": pid,
        "create_time": _create_time(pid),
        "host": host,
        "port": port,
        "url": url,
        "ui_url": ui_url,
        "database": _display_database(database),
        "prefect_home": str(sdir),
        "log": str(log),
        "started_at": time.time(),
    }
    _write_state(sdir, state)  # written at once so a crash of this process leaves a trace
    if _wait_healthy(url, pid=pid, timeout=timeout):
        return _info(state)
    alive = _alive(pid)
    if alive:
        _terminate(pid, timeout=10)
    (sdir / STATE_FILE).unlink(missing_ok=True)
    last = _last_log_line(log, log_offset, secret=_password(database))
    why = f"did not answer within {timeout:g} s" if alive else "exited"
    raise CruijffError(f"the Prefect server {why}: {last or '(no output)'} (log: {log})")


def _prefect_command() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "prefect"]


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


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _rotate(log: Path) -> None:
    with contextlib.suppress(OSError):
        if log.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(log, log.with_name(log.name + ".1"))


def _last_log_line(log: Path, offset: int, secret: str | None = None) -> str:
    """The most telling line the server wrote since `offset` (its error, if it printed one)."""
    try:
        with log.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if secret:
        lines = [line.replace(secret, "***") for line in lines]
    errors = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if errors:
        return errors[-1]
    meaningful = [line for line in lines if not any(n in line for n in _LOG_NOISE)]
    return (meaningful or lines or [""])[-1]


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM the server's process group, then SIGKILL it after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# processes, ports, health


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except ImportError:
        pass
    except Exception:  # NoSuchProcess, AccessDenied (then it is alive but not ours)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _is_ours_and_alive(state: dict) -> bool:
    """The pid in server.json is still the Prefect server we started (not a reused pid)."""
    try:
        pid = int(state["pid"])
    except (TypeError, ValueError):
        return False
    if pid <= 0 or not _alive(pid):
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        if (
            state.get("create_time") is not None
            and abs(proc.create_time() - float(state["create_time"])) > 1.0
        ):
            return False
        cmdline = " ".join(proc.cmdline())
        return "prefect" in cmdline and "server" in cmdline
    except ImportError:
        return True
    except Exception:
        return False


PORT_RELEASE_S = 10.0


def _choose_port(host: str, port: int | None, previous: int | None) -> int:
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CruijffError(f"cannot serve on host '{host}': {exc}") from None
    if port is not None:
        if not _port_free(host, port):
            raise CruijffError(
                f"port {port} on {host} is already in use by another program; choose another "
                "port or stop that program"
            )
        return port
    if previous:
        # The same port when at all possible: runs still going reconnect to it by themselves.
        # A server just killed may hold it for a few seconds while it dies.
        deadline = time.monotonic() + PORT_RELEASE_S
        while True:
            if _port_free(host, int(previous)):
                return int(previous)
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as exc:
            raise CruijffError(f"cannot serve on host '{host}': {exc}") from None
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return DEFAULT_HOST
    return f"[{host}]" if ":" in host else host


def _health(url: str, timeout: float) -> tuple[int | None, str]:
    """(HTTP status, '') or (None, reason) for GET <url>/health."""
    request = urllib.request.Request(url.rstrip("/") + "/health", method="GET")
    # A local server must never go through an HTTP proxy from the environment.
    handler = urllib.request.ProxyHandler({}) if _is_local(url) else urllib.request.ProxyHandler()
    opener = urllib.request.build_opener(handler)
    try:
        with opener.open(request, timeout=timeout) as resp:
            resp.read(64)
            return resp.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except urllib.error.URLError as exc:
        reason = exc.reason
        return None, str(getattr(reason, "strerror", None) or reason)
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        return None, str(exc) or type(exc).__name__


def _healthy(url: str, timeout: float = 2.0) -> bool:
    return _health(url, timeout)[0] == 200


def _wait_healthy(url: str, *, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _healthy(url, timeout=2.0):
            return True
        if not _alive(pid) or time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _is_local(url: str) -> bool:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return host in ("127.0.0.1", "localhost", "::1")


def _same_url(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        return u.strip().rstrip("/").replace("://localhost:", "://127.0.0.1:")

    return norm(a) == norm(b)


def _ui_url_for(api_url: str) -> str:
    url = api_url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


# ---------------------------------------------------------------------------------------------
# ensure_api helpers


def _configured_api_url() -> tuple[str, str]:
    """PREFECT_API_URL from Prefect's own settings (active profile, prefect.toml, .env)."""
    from prefect.settings import Settings  # lazy: prefect is about to run flows anyway

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
    status, reason = _health(url, timeout=5.0)
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


def _export_api_url(url: str) -> None:
    global _EXPORTED
    _EXPORTED = url
    os.environ["PREFECT_API_URL"] = url
    # Belt and braces: a process that somehow lost the URL fails loudly instead of starting a
    # temporary server of its own (Prefect's default profile enables that).
    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    # Prefect reads its settings once at import; refresh them if it is already imported.
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


def running_api(home: Path) -> str | None:
    """The API URL flows would use, if a server answers there now; starts nothing."""
    url = os.environ.get("PREFECT_API_URL", "").strip() or _configured_api_url()[0]
    if not url:
        info = server_status(home)
        return info.url if info else None
    return url.rstrip("/") if _healthy(url) else None
