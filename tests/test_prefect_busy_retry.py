"""The managed Prefect server runs a write SQLite refused ("database is locked", answered 503)
again at once instead of letting Prefect's client wait 2 s (flows/prefect_server.RetryBusy).
An ASGI app stands in for Prefect's here (answering 503 and raising, as Starlette does after
its error handler); every test with a managed Prefect server runs behind it."""

from __future__ import annotations

import asyncio

from cruijff.flows.prefect_server import RetryBusy


class Flaky:
    """Answers 503 (then raises, as Starlette's ServerErrorMiddleware does) `busy` times,
    then 201 with the request body it read; FastAPI-like, it leaves things in the scope."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.bodies: list[bytes] = []
        self.scopes: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        self.scopes.append({**scope, "state": dict(scope["state"])})
        scope["fastapi_astack"] = "closed after this run"
        scope["state"]["seen"] = True
        message = await receive()
        self.bodies.append(message["body"])
        status = 503 if self.busy > 0 else 201
        self.busy -= 1
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"busy" if status == 503 else b"ok"})
        if status == 503:
            raise RuntimeError("database is locked")


def call(app, body: bytes) -> list[dict]:
    """One POST through `app` as a server would make it; the messages the client got."""
    sent: list[dict] = []
    parts = [{"type": "http.request", "body": body[:3], "more_body": True},
             {"type": "http.request", "body": body[3:], "more_body": False}]

    async def receive() -> dict:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/task_runs/", "state": {}}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_request_the_database_was_busy_for_is_run_again_before_the_client_sees_it():
    app = Flaky(busy=2)
    sent = call(RetryBusy(app, delays=(0, 0, 0)), b'{"name": "x"}')
    assert [m.get("status") for m in sent] == [201, None] and sent[1]["body"] == b"ok"
    assert app.bodies == [b'{"name": "x"}'] * 3  # each run read the whole body
    assert all("fastapi_astack" not in s and s["state"] == {} for s in app.scopes)


def test_still_busy_after_the_retries_the_client_gets_the_503_and_the_error_is_raised():
    app = Flaky(busy=5)
    try:
        call(RetryBusy(app, delays=(0, 0)), b"{}")
    except RuntimeError as exc:
        assert "database is locked" in str(exc)  # the server logs it, as before
    else:
        raise AssertionError("the last run's error was swallowed")
    assert len(app.bodies) == 3


def test_other_answers_and_errors_pass_through_untouched():
    async def broken(scope, receive, send) -> None:
        await receive()
        raise ValueError("a bug")

    try:
        call(RetryBusy(broken, delays=(0,)), b"{}")
    except ValueError:
        pass
    else:
        raise AssertionError("an error without a 503 was swallowed")
    app = Flaky(busy=0)
    assert call(RetryBusy(app), b"{}")[0]["status"] == 201
    assert len(app.bodies) == 1
