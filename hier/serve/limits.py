"""Limits on what a client sends: request bodies stopped at their limit (413), multipart form limits,
and the admin token checked before a body is read."""
from __future__ import annotations

import asyncio
import hmac
import os

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ADMIN_TOKEN_ENV = "HIER_ADMIN_TOKEN"     # /enroll is refused unless requests carry this variable's value
FORM_OVERHEAD = 256 * 2 ** 10           # multipart framing and the text fields, beyond the files
FORM_LIMITS = {"max_files": 1, "max_fields": 16, "max_part_size": 16 * 2 ** 10}


class BodyTooLarge(HTTPException):
    """413, raised while a body is read: an HTTPException, so FastAPI's form parsing passes it on as it
    is (any other error there becomes a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the {limit / 2 ** 20:.3g} MB limit")


class BodyTooSlow(HTTPException):
    """408, raised while a body is read: a client that trickles its upload holds a connection and
    spooled temporary space; past the deadline or below the rate it is answered and let go."""

    def __init__(self, why: str):
        super().__init__(408, f"request body {why}; send it at once")


class BodyLimit:
    """Stops reading a request body once it passes its limit, and answers 413 (JSON, as every refusal
    here): a declared Content-Length over the limit before a byte is read, a chunked body (no
    Content-Length) as soon as the bytes received pass it. ``limits``: bytes by path, ``default`` else.
    (FastAPI's own ``max_body_size`` answers a declared length in plain text.) A body that takes longer
    than ``deadline_s``, or arrives slower than ``min_rate`` bytes/s once ``grace_s`` have passed, is
    answered 408 (a slow client cannot hold a connection and its upload's spooled files)."""

    def __init__(self, app: ASGIApp, default: int, limits: dict[str, int], deadline_s: float = 30.0,
                 min_rate: float = 16 * 2 ** 10, grace_s: float = 5.0):
        self.app, self.default, self.limits = app, default, limits
        self.deadline_s, self.min_rate, self.grace_s = deadline_s, min_rate, grace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(BodyTooLarge(limit), scope, receive, send)
            return
        received, started, body_done = 0, False, False
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def receive_() -> Message:
            nonlocal received, body_done
            if body_done:                       # after the body: waiting for a disconnect is not bounded
                return await receive()
            elapsed = loop.time() - start
            # by the deadline, and by when a client sending at min_rate would have sent more (grace_s' lag)
            wait = min(self.deadline_s - elapsed, received / self.min_rate + self.grace_s - elapsed)
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                raise BodyTooSlow(f"not received within {self.deadline_s:g} s" if loop.time() - start >=
                                  self.deadline_s else f"arriving slower than {self.min_rate / 1024:g} KB/s") \
                    from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise BodyTooLarge(limit)
            else:
                body_done = True
            return message

        async def send_(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_, send_)
        except (BodyTooLarge, BodyTooSlow) as e:     # raised where no handler answered it
            if started:
                raise
            await _refuse(e, scope, receive, send)


async def _refuse(e: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse({"detail": e.detail}, status_code=e.status_code)(scope, receive, send)


def admin_refusal(token: str | None) -> tuple[int, str] | None:
    """(status, detail) when ``token`` may not enroll, None when it may."""
    expected = os.environ.get(ADMIN_TOKEN_ENV)
    if not expected:
        return 403, f"enrollment is disabled: start the service with {ADMIN_TOKEN_ENV} set"
    if not token or not hmac.compare_digest(token.encode(), expected.encode()):
        return 401, "a valid X-Admin-Token header is needed to change classes (enroll, unenroll)"
    return None


class AdminRoute(APIRoute):
    """A route only an admin may call: the token is checked from the headers before the body is read
    (FastAPI reads and parses a form before it runs a dependency)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            refusal = admin_refusal(request.headers.get("x-admin-token"))
            if refusal:
                return JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
            return await handler(request)

        return checked
