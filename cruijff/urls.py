"""Showing a database or server URL without its password (one rule for every message and file).

Plain string work, no URL parser: `urllib.parse` raises on some URLs (a broken IPv6 host) and
ends the host at a '/' that an unquoted password may hold, while SQLAlchemy accepts passwords
with '/' or '?' but stops at the first '@'. Here the user information runs to the URL's last '@',
so a password is masked whatever it holds; at worst an '@' later in the URL masks a little more.
"""

from __future__ import annotations

MASK = "***"


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """(prefix up to and with the ':' after the user name, password, '@' and the rest), or None
    when the URL has no password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    at = rest.rfind("@")
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if not colon:
        return None
    return f"{scheme}://{user}:", password, rest[at:]


def mask_url(url: str) -> str:
    """`url` with its password, if it has one, replaced by ***; anything else unchanged.

    `postgresql+asyncpg://prefect:s3cret@db:5432/prefect` becomes
    `postgresql+asyncpg://prefect:***@db:5432/prefect`.
    """
    parts = _userinfo(url)
    if parts is None:
        return url
    head, _, tail = parts
    return f"{head}{MASK}{tail}"


def url_password(url: str) -> str | None:
    """The password in `url` as written there (percent-encoding kept), or None if it has none."""
    parts = _userinfo(url)
    return (parts[1] or None) if parts is not None else None
