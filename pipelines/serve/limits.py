"""The request-body size limit, as ASGI middleware.

A body over ``max_bytes`` is refused with 413 before it is read: at once when its Content-Length
says so, and as soon as the running count passes the limit for a body without one (chunked
uploads). The count wraps ``receive``, so nothing is buffered here; the exception it raises is an
HTTPException, which FastAPI's body parsing lets through to the app's handler (any other error
there becomes "400 error parsing the body"). Once the 413 is sent, uvicorn discards the rest of the
body and keeps the connection, so the client reads the answer instead of a reset.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int, size: int | None = None):
        got = f" ({size:,} bytes)" if size is not None else ""
        super().__init__(413, f"The request body{got} is over this server's limit of {max_bytes:,} bytes "
                              "(`mmrag serve --max-upload-mb`); send smaller or fewer images.")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(BodyTooLarge(self.max_bytes, declared), scope, receive, send)
            return
        seen, started = 0, False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as error:  # read outside the app's handlers (a middleware, a mounted app)
            if started:
                raise
            await _refuse(error, scope, receive, send)


async def _refuse(error: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error_body("payload_too_large", error.detail, None), status_code=413)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 and httptools refuse such requests before they get here
    return None
