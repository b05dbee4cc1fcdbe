"""Request limits, as pure ASGI middleware: the body size (a declared Content-Length over the limit is refused before
a byte is read, a body that grows past it while streaming stops there), the time a body may take to arrive, and how
many requests are answered at once."""

from __future__ import annotations

import asyncio
import json


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit (the app answers 413)."""


class UploadsInFlightFull(Exception):
    """Raised from `receive` when a streamed body would take the bodies held at once past their budget (503)."""


class UploadTimedOut(Exception):
    """Raised from `receive` when a body takes longer than the upload timeout to arrive (the app answers 408)."""


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()  # as the app's JSONResponse writes it
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """At most `max_bytes` of body, and never `timeout` seconds without a byte of it (a client that sends a few
    bytes of a promised upload and stalls would otherwise hold its request slot for good; a slow but steady upload
    goes on). With `max_in_flight`, the bodies of all requests being answered hold at most that many bytes together:
    a request that would pass it is answered 503 with Retry-After (before its upload is read when it declares its
    length), where concurrency x upload size alone allowed 256 x 64 MiB."""

    def __init__(self, app, max_bytes: int, timeout: float = 15.0, max_in_flight: int | None = None):
        self.app, self.max_bytes, self.timeout, self.max_in_flight = app, max_bytes, timeout, max_in_flight
        self.in_flight = 0

    def _busy(self, more: int) -> str | None:
        if self.max_in_flight is None or self.in_flight + more <= self.max_in_flight:
            return None
        return (f"busy: the uploads being answered hold {self.in_flight} bytes, and this one would pass the "
                f"{self.max_in_flight} byte budget (--max-inflight-mb); retry later")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            reason = (f"upload of {int(declared)} bytes is over the {self.max_bytes} byte limit" if declared.isdigit()
                      else "invalid Content-Length header")
            return await send_json(send, 413 if declared.isdigit() else 400, {"error": reason})
        busy = self._busy(int(declared)) if declared is not None else None
        if busy:
            return await send_json(send, 503, {"error": busy}, {"Retry-After": "1"})
        received, body_done = 0, False

        async def limited():
            nonlocal received, body_done
            if body_done:  # after the body: waiting for a disconnect, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise UploadTimedOut(f"the upload stalled: no data for {self.timeout:g} s") from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                busy = self._busy(size)
                if busy:
                    raise UploadsInFlightFull(busy)
                received += size
                self.in_flight += size
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(f"upload is over the {self.max_bytes} byte limit")
            return message

        try:
            await self.app(scope, limited, send)
        finally:  # the body is held until the answer is sent
            self.in_flight -= received


class RequestLimit:
    """At most `max_requests` requests answered at once, /health aside (a load balancer must still see the service
    up); the next gets 503 with Retry-After before its upload is read. Requests, not connections: a connection that
    has not sent its headers never reaches it (uvicorn's own connection limit counted those, so a few idle sockets
    locked every client out), and a body that stalls is cut off by BodyLimit's timeout. A request still unanswered
    when a shutdown's grace period ends (uvicorn cancels it) gets a JSON 503 rather than a dropped connection and a
    CancelledError traceback in the log."""

    EXEMPT = ("/health", "/metrics")  # cheap, and a scrape must see a saturated service

    def __init__(self, app, max_requests: int | None):
        self.app, self.max_requests, self.active = app, max_requests, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = self.max_requests is not None and scope["path"] not in self.EXEMPT
        if counted and self.active >= self.max_requests:
            return await send_json(send, 503, {"error": f"busy: {self.active} requests are being answered (at most "
                                                        f"{self.max_requests}); retry later"}, {"Retry-After": "1"})
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.active += counted
        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if started:
                raise
            await send_json(send, 503, {"error": "the service shut down before this request was answered; retry"},
                            {"Retry-After": "1"})
        finally:
            self.active -= counted
