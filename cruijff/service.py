"""Supervising one long-lived background process (a local server) from short-lived commands.

Any number of cruijff processes share the one process: a state directory holds what they need
to find and check it, whoever started it.

- ``<name>.json``  its pid (with the process's start time), port and URL
- ``<name>.log``   its stdout and stderr (rotated at 10 MB)
- ``<name>.lock``  serializes check-and-start / stop between processes

The process is started detached (its own session, nobody's child here), so it outlives the
command that started it. Kept apart from what the process is (the Prefect server, in
`cruijff.flows.server`) so that this part imports neither prefect nor anything else heavy.
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
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cruijff.errors import CruijffError
from cruijff.fileio import lock_within

LOOPBACK = "127.0.0.1"
PORT_RELEASE_S = 10.0
"""How long `choose_port` waits for the previous port, which a process just killed may still
hold for a few seconds while it dies."""
LOG_ROTATE_BYTES = 10 * 1024 * 1024
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")

# Started by a short-lived launcher so the process is nobody's child here: no zombie and no
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
class Service:
    """The state directory of one supervised process."""

    directory: Path
    name: str = "server"  # the files are <name>.json, <name>.log and <name>.lock
    what: str = "the server"  # in messages: "could not launch <what>"
    required: tuple[str, ...] = ("pid",)  # keys a state file must have to count

    @property
    def state_file(self) -> Path:
        return self.directory / f"{self.name}.json"

    @property
    def log_file(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def lock_file(self) -> Path:
        return self.directory / f"{self.name}.lock"

    # -- state on disk -------------------------------------------------------------------------

    def read_state(self) -> dict | None:
        """The state file's contents, or None if it is missing, unreadable or incomplete."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or not set(self.required) <= state.keys():
            return None
        return state

    def write_state(self, state: Mapping) -> None:
        """Replace the state file atomically (readers never see half of it)."""
        tmp = self.directory / f".{self.state_file.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dict(state), indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def remove_state(self) -> None:
        self.state_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the lock file (between processes) for check-and-start or stop."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                lock_within(fd, max(timeout, 1) + 30)
            except BlockingIOError:
                raise CruijffError(
                    f"another cruijff process holds {self.lock_file} (starting or "
                    f"stopping {self.what}); try again when it is done"
                ) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- starting ------------------------------------------------------------------------------

    def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], banner: str
    ) -> tuple[int, int]:
        """Start `argv` detached, in the state directory (no config files from the caller's
        working directory), output appended to the log after a line with `banner`.

        Returns (pid, offset of this start's output in the log) for `last_log_line`.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.log_file
        rotate(log)
        with log.open("ab") as fh:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            fh.write(f"--- {stamp} cruijff: {banner} ---\n".encode())
            offset = fh.tell()
        try:
            launched = subprocess.run(
                [sys.executable, "-c", _LAUNCHER, str(log), *argv],
                cwd=self.directory,
                env=dict(env),
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            pid = int(launched.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            raise CruijffError(f"could not launch {self.what}: {exc}") from exc
        return pid, offset


# ---------------------------------------------------------------------------------------------
# processes


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (it is reaped if it is our child)."""
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


def create_time(pid: int) -> float | None:
    """When the process started (to tell a reused pid from it later); None without psutil."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def is_ours_and_alive(state: Mapping, must_contain: Iterable[str] = ()) -> bool:
    """The pid in `state` is still the process that was started (not a reused pid): alive, with
    the recorded start time and a command line holding every word of `must_contain`."""
    try:
        pid = int(state["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0 or not alive(pid):
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
        return all(word in cmdline for word in must_contain)
    except ImportError:
        return True
    except Exception:
        return False


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM the process group of `pid` (a `spawn`ed process leads its own), then SIGKILL it
    after `timeout` seconds."""
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
            if not alive(pid):
                return
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# ports


def choose_port(
    host: str, port: int | None, previous: int | None, *, release_s: float = PORT_RELEASE_S
) -> int:
    """`port` if given (an error when it is taken), else `previous` when it is or becomes free
    within `release_s`, else a free port the system picks."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CruijffError(f"cannot serve on host '{host}': {exc}") from None
    if port is not None:
        if not port_free(host, port):
            raise CruijffError(
                f"port {port} on {host} is already in use by another program; choose another "
                "port or stop that program"
            )
        return port
    if previous:
        # The same port when at all possible: clients still going reconnect to it by
        # themselves. A process just killed may hold it for a few seconds while it dies.
        deadline = time.monotonic() + release_s
        while True:
            if port_free(host, int(previous)):
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


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def url_host(host: str) -> str:
    """How a URL names a server listening on `host` (a wildcard address: the loopback)."""
    if host in ("0.0.0.0", "", "::"):
        return LOOPBACK
    return f"[{host}]" if ":" in host else host


# ---------------------------------------------------------------------------------------------
# health


def health(url: str, timeout: float) -> tuple[int | None, str]:
    """(HTTP status, '') or (None, reason) for GET <url>/health."""
    request = urllib.request.Request(url.rstrip("/") + "/health", method="GET")
    # A local server must never go through an HTTP proxy from the environment.
    handler = urllib.request.ProxyHandler({}) if is_local(url) else urllib.request.ProxyHandler()
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


def healthy(url: str, timeout: float = 2.0) -> bool:
    return health(url, timeout)[0] == 200


def wait_healthy(url: str, *, pid: int, timeout: float) -> bool:
    """Poll until `url` is healthy (True), or `pid` died or `timeout` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if healthy(url, timeout=2.0):
            return True
        if not alive(pid) or time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def is_local(url: str) -> bool:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return host in ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------------------------------------
# the log


def rotate(log: Path, max_bytes: int = LOG_ROTATE_BYTES) -> None:
    """Move `log` to `<log>.1` (replacing it) once it is larger than `max_bytes`."""
    with contextlib.suppress(OSError):
        if log.stat().st_size > max_bytes:
            os.replace(log, log.with_name(log.name + ".1"))


def last_log_line(
    log: Path, offset: int, *, secret: str | None = None, noise: Iterable[str] = ()
) -> str:
    """The most telling line written to `log` since `offset`: the last exception line if there
    is one, else the last line without any of the `noise` substrings. `secret` shows as ***."""
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
    noise = tuple(noise)
    meaningful = [line for line in lines if not any(n in line for n in noise)]
    return (meaningful or lines or [""])[-1]
