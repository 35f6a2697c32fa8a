"""cruijff.urls.mask_url: the one rule for showing a URL in messages, state files and logs."""

from __future__ import annotations

import pytest

from cruijff.urls import mask_url, url_password

SECRET = "s3cret-Xq9"

MASKED = [
    # (url, masked): the password never shows, everything else does
    (
        f"postgresql+asyncpg://prefect:{SECRET}@db.example:5432/prefect",
        "postgresql+asyncpg://prefect:***@db.example:5432/prefect",
    ),
    (
        f"postgresql+psycopg://team:{SECRET}@db.example/results?sslmode=require",
        "postgresql+psycopg://team:***@db.example/results?sslmode=require",
    ),
    (f"https://user:{SECRET}@prefect.example/api", "https://user:***@prefect.example/api"),
    # '@', ':', '/', '?' and '#' in an unquoted password (SQLAlchemy accepts '/' and '?')
    (f"postgresql://u:p@{SECRET}@db:5432/x", "postgresql://u:***@db:5432/x"),
    (f"postgresql://u:a:{SECRET}@db/x", "postgresql://u:***@db/x"),
    (f"postgresql://u:a/{SECRET}@db/x", "postgresql://u:***@db/x"),
    (f"postgresql://u:a?{SECRET}#b@db/x", "postgresql://u:***@db/x"),
    (f"postgresql://u:{SECRET}%40x@db/x", "postgresql://u:***@db/x"),  # percent-encoded
    # urllib.parse raises ValueError on these ("Invalid IPv6 URL", a non-numeric port)
    (f"postgresql://u:{SECRET}@[::1/x", "postgresql://u:***@[::1/x"),
    (f"postgresql://u:{SECRET}@db:port/x", "postgresql://u:***@db:port/x"),
    ("postgresql://u:@db/x", "postgresql://u:***@db/x"),  # an empty password is one too
]

UNCHANGED = [
    "postgresql+asyncpg://prefect@db.example:5432/prefect",  # a user, no password
    "postgresql://db.example/prefect",
    "http://127.0.0.1:4242/api",
    "http://[::1]:4242/api",
    "sqlite+aiosqlite:////tmp/x.db",
    "sqlite:///results.sqlite",
    "sqlite://",
    "not a url: with@at",
    "",
]


@pytest.mark.parametrize(("url", "masked"), MASKED)
def test_password_is_masked(url, masked):
    shown = mask_url(url)
    assert shown == masked
    assert SECRET not in shown and "***" in shown


@pytest.mark.parametrize("url", UNCHANGED)
def test_url_without_password_is_unchanged(url):
    assert mask_url(url) == url
    assert url_password(url) is None


def test_password_is_the_masked_part():
    assert url_password(f"postgresql+asyncpg://prefect:{SECRET}@db/prefect") == SECRET
    assert url_password(f"postgresql://u:p@{SECRET}@db/x") == f"p@{SECRET}"
    assert url_password(f"postgresql://u:a/{SECRET}@db/x") == f"a/{SECRET}"
    assert url_password("postgresql://u:@db/x") is None
