"""ASGI middleware: 413 for request bodies over the limit, before they are buffered."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException

from octoflux.api.common.dialects import send_error
from octoflux.core.errors import TooLarge, problem


class BodyTooLarge(HTTPException):
    """An HTTPException, because FastAPI turns any other error while reading a body into a 400."""

    def __init__(self, detail: str):
        super().__init__(status_code=413, detail=detail)


class BodySizeLimit:
    """The 413 is written in the error shape of the API the path belongs to."""

    def __init__(
        self,
        app,
        max_bytes: int,
        exempt: Callable[[str], bool] | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        # Routes that enforce their own limit (LoRA uploads, up to --max-lora-mb).
        self.exempt = exempt or (lambda path: False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.exempt(scope.get("path", "")):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, send)
        received = 0
        response_started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._message())
            return message

        async def tracking_send(message):
            nonlocal response_started
            response_started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._reject(scope, send)

    def _message(self) -> str:
        return f"request body exceeds the {self.max_bytes / 2**20:g} MB limit"

    async def _reject(self, scope, send) -> None:
        await send_error(send, scope.get("path", ""), problem(TooLarge(self._message())))
