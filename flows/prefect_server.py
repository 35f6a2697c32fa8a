"""The Prefect server cruijff manages: `prefect server start` in the foreground (one worker,
its services), plus one thing, RetryBusy.

Prefect's SQLite database answers a write that raced another one with "database is locked"
(a deferred transaction cannot upgrade), which the API turns into HTTP 503; Prefect's client
then waits 2**n s. Every task run asks for its tags' concurrency slots in such a transaction,
so about one stage hand-off in four waited 2 s for nothing (issue 17, measured: 12 of 105 API
calls of a 24-stage run were 503s). Retried at once, the write goes through.

    python -m cruijff.flows.prefect_server HOST PORT
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

BUSY_RETRY_DELAYS_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
"""Pauses before a request answered 503 is run again here; after the last, the client gets
the 503 and backs off as before (so no request is given up sooner than it was)."""


class RetryBusy:
    """ASGI middleware: run an HTTP request whose answer is 503 again, after a short pause,
    before the client sees it. The request's body is kept to be read again; the handler's
    transaction was rolled back, so running it again is what the client's retry would do."""

    def __init__(self, app: App, delays: tuple[float, ...] = BUSY_RETRY_DELAYS_S) -> None:
        self.app = app
        self.delays = delays

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        for delay in (*self.delays, None):
            if not await self._attempt(scope, body, receive, send, hold_503=delay is not None):
                return
            await asyncio.sleep(delay or 0)

    async def _attempt(self, scope: Scope, body: bytes, receive: Receive, send: Send, *,
                       hold_503: bool) -> bool:
        """Run the request once; True if it was answered 503 and the answer held back."""
        given = False
        held = False

        async def replay() -> Message:
            nonlocal given
            if given:  # the app waits for a disconnect: the real one
                return await receive()
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def answer(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and hold_503 \
                    and message["status"] == 503:
                held = True
            if not held:
                await send(message)

        # Each run gets the scope as the server gave it: FastAPI keeps per-request things in
        # it (its dependencies' exit stacks, state) that the first run has closed.
        fresh = {**scope, **({"state": dict(scope["state"])} if "state" in scope else {})}
        try:
            await self.app(fresh, replay, answer)
        except Exception:
            # Starlette raises the handled error again after its 503 is sent (for the
            # server's log): held back, the request runs again instead
            if not held:
                raise
        return held


def main(argv: list[str]) -> None:
    import uvicorn
    from prefect.logging.configuration import setup_logging
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
        PREFECT_SERVER_LOGGING_LEVEL,
    )

    host, port = argv
    setup_logging()  # as Prefect's CLI does: the server's errors reach its log
    uvicorn.run(
        RetryBusy(create_app(final=True)), host=host, port=int(port),
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower(),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
