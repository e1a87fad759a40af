"""What a request must pass before the app reads it, and OpenAI's error shape that every refusal takes.

:class:`Guard` refuses, in this order: on a loopback server, a ``Host`` that is not a loopback name (a DNS
rebinding page in a browser sends its own domain); without the API key, every endpoint but ``/health``; a body
over the size limit, by its ``Content-Length`` or, streamed in chunks, once the bytes received pass the limit.
"""

from __future__ import annotations

import ipaddress
import json
from secrets import compare_digest
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = ("/health",)  # answered without the API key
MAX_BODY_BYTES = 4 * 2**20  # the default limit on a request body


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; ``code`` defaults to the HTTP status."""
    kind = {429: "rate_limit_error", 404: "not_found_error"}.get(status)
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> Response:
    """An error reply, its JSON ASCII-escaped so that a message quoting a client's text always encodes."""
    body = json.dumps(error_body(status, message, param, code))
    return Response(body, status, headers, media_type="application/json")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a ``Host`` header) names this machine only: ``localhost``, a
    ``*.localhost`` name or a loopback address (127.0.0.0/8, ``::1``, bare or bracketed), with or without a port."""
    try:
        name = urlsplit(f"//{host}").hostname or host  # a bare IPv6 address has no hostname in a URL
    except ValueError:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """Pure ASGI middleware: refuses requests by ``Host`` (when ``loopback_only``), API key (when ``api_key``) and
    body size (``max_body_bytes``) before the app sees them. The body is counted as it streams in, so no more
    than the limit (plus one chunk) is ever buffered; going over raises ``HTTPException(413)`` in the app's body
    read, which the app's handler turns into the same error reply."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None, loopback_only: bool) -> None:
        self.app, self.max_body_bytes, self.loopback_only = app, max_body_bytes, loopback_only
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, self.too_large)
            return message

        await self.app(scope, receive_within_limit, send)

    @property
    def too_large(self) -> str:
        return f"the request body exceeds this server's limit of {self.max_body_bytes} bytes"

    def refusal(self, scope: Scope) -> Response | None:
        """The reply to a request refused on its headers alone, or None."""
        headers = Headers(scope=scope)
        if self.loopback_only and not is_loopback(headers.get("host", "")):
            return error_response(400, "this server answers requests to localhost only (check the Host header)")
        if self.key is not None and scope["path"] not in OPEN_PATHS and not compare_digest(bearer(headers), self.key):
            message = "a valid API key is required: send 'Authorization: Bearer <key>'"
            return error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return error_response(413, self.too_large)
        return None


def bearer(headers: Headers) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header, as sent (b"" without one)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
