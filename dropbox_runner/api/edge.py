"""The HTTP edge, before any route: which `Host` the server answers, which `Origin` may change state,
and the API key (a bearer header, or the page's cookie set once from `/?key=`).

Pure ASGI, so an upload's body streams through untouched; its refusals are in the API's one error
envelope. docs/http-edge.md has the decisions.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse

from dropbox_runner.api.envelope import envelope

KEY_COOKIE = "dropbox_runner_key"  # set by opening /?key=<key>, so the page's own requests carry it
LOOPBACK_NAMES = frozenset({"localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """`name`, `name:port`, `[v6]` or `[v6]:port` as (lower-case name, port), or None if malformed."""
    try:
        parts = urlsplit(f"//{value}")
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.password is not None or parts.path or parts.query:
        return None
    return name.rstrip("."), port


def same_key(given: str, key: str) -> bool:
    """Compared as bytes: a header or cookie may hold any character (str comparison refuses non-ASCII)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8"))


class Edge:
    """Refuses, in this order: an unknown `Host` (400), a state change from another origin (403), a
    missing or wrong key (401). Opening `/?key=<key>` sets the cookie and redirects to the clean URL."""

    def __init__(self, app: Any, *, api_key: str | None, allowed_hosts: list[str]) -> None:
        self.app, self.api_key = app, api_key
        self.allowed = frozenset(h.lower().rstrip(".") for h in allowed_hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refusal(request)
        if (
            refusal is None
            and self.api_key
            and request.scope["path"] == "/"
            and "key" in request.query_params
        ):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "key"]
            refusal = RedirectResponse("/" + (f"?{urlencode(rest)}" if rest else ""), status_code=303)
            refusal.set_cookie(KEY_COOKIE, self.api_key, httponly=True, samesite="strict")
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        host = request.headers.get("host", "")
        if not self.serves(host, request.scope.get("server")):
            return envelope(
                400,
                f"this server does not answer for Host {host[:100]!r}; add the name to settings.allowed_hosts",
                code="host_not_allowed",
            )
        origin = request.headers.get("origin")
        if request.method not in SAFE_METHODS and origin is not None and not same_origin(origin, host):
            return envelope(
                403, f"a {request.method} from origin {origin[:100]!r} is refused", code="cross_origin"
            )
        if self.api_key and request.scope["path"] != "/healthz" and not self.authorized(request):
            return envelope(401, "missing or wrong API key", code="invalid_api_key")
        return None

    def serves(self, host: str, server: tuple[str, int] | None) -> bool:
        """Loopback names and addresses, the address this connection came in on, allowed_hosts."""
        parsed = split_host(host)
        if parsed is None:
            return False
        name = parsed[0]
        return (
            is_loopback(name)
            or name in self.allowed
            or (server is not None and name == str(server[0]).lower())
        )

    def authorized(self, request: Request) -> bool:
        key = self.api_key or ""
        query = request.query_params.get("key", "") if request.scope["path"] == "/" else ""
        return any(
            same_key(given, expected)
            for given, expected in (
                (request.headers.get("authorization", ""), f"Bearer {key}"),
                (request.cookies.get(KEY_COOKIE, ""), key),
                (query, key),
            )
        )


def same_origin(origin: str, host: str) -> bool:
    """The page's own origin is the Host it was served from; scheme aside, the port is compared as the
    browser wrote it (default ports filled in on both sides)."""
    try:
        parts = urlsplit(origin)
        theirs = (parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme))
    except ValueError:
        return False
    ours = split_host(host)
    if ours is None or parts.scheme not in ("http", "https"):
        return False
    default = {"http": 80, "https": 443}[parts.scheme]
    return theirs == (ours[0], ours[1] or default)
