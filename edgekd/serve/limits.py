"""The request body limit, as pure ASGI middleware: a declared Content-Length over the limit is refused before a
byte is read, a body that grows past it while streaming stops there."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit (the app answers 413)."""


async def send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()  # as the app's JSONResponse writes it
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            reason = (f"upload of {int(declared)} bytes is over the {self.max_bytes} byte limit" if declared.isdigit()
                      else "invalid Content-Length header")
            return await send_json(send, 413 if declared.isdigit() else 400, {"error": reason})
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(f"upload is over the {self.max_bytes} byte limit")
            return message

        await self.app(scope, limited, send)
