"""A1111's ``--api-auth user:password[,user:password...]``: HTTP Basic on every ``/sdapi/v1`` route.

A1111 adds ``Depends(self.auth)`` (over FastAPI's ``HTTPBasic()``) to each route it registers with
``add_api_route``, and every HTTPException goes through its ``api_middleware``, which drops the
exception's headers (no ``WWW-Authenticate`` reaches the client). So a call without credentials, with
another scheme, or with undecodable ones answers 401 ``Not authenticated`` / ``Invalid authentication
credentials``; a wrong user or password 401 ``Incorrect username or password``; all in the
``{"error", "detail", "body", "errors"}`` shape. The check runs before the body is validated, so a
bad body without credentials is a 401, not a 422. Paths outside ``/sdapi/v1`` (and the stand-in's own
``/standin`` controls) are open.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from a1111.shapes import a1111_error

PREFIX = "/sdapi/v1/"


def parse_api_auth(value: str) -> dict[str, str]:
    """A1111 splits on ',' then ':' (exactly one colon per pair, or it fails to start)."""
    credentials: dict[str, str] = {}
    for pair in value.split(","):
        user, password = pair.split(":")  # ValueError as in A1111 for anything but one colon
        credentials[user] = password
    return credentials


class ApiAuth:
    """ASGI middleware: A1111's per-route ``auth`` dependency for the routes under ``/sdapi/v1``."""

    def __init__(self, app: ASGIApp, credentials: dict[str, str], routes: set[str]) -> None:
        self.app = app
        self.credentials = credentials
        self.routes = routes  # the registered /sdapi/v1 paths; others are 404 as before

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.routes:
            detail = self._refusal(dict(scope["headers"]).get(b"authorization", b""))
            if detail:
                await a1111_error(401, "HTTPException", detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, header: bytes) -> str:
        scheme, _, encoded = header.decode("latin-1").partition(" ")
        if not header or scheme.lower() != "basic":
            return "Not authenticated"
        try:
            user, colon, password = base64.b64decode(encoded).decode("ascii").partition(":")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            return "Invalid authentication credentials"
        if not colon:
            return "Invalid authentication credentials"
        expected = self.credentials.get(user)
        if expected is not None and secrets.compare_digest(password, expected):
            return ""
        return "Incorrect username or password"
