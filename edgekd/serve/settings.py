"""The service's settings and the rules `edgekd serve` and `create_app` both apply to them."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from edgekd.errors import EdgeKDError


@dataclass
class ServeSettings:
    """How the service batches, bounds and guards its work (the model's own settings are the Runner's)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_concurrency: int | None = 256
    """Requests being answered at once (/health aside) before the service answers 503; idle connections do not
    count."""
    token: str | None = None
    max_upload_mb: float = 64.0
    max_inflight_mb: float | None = 1024.0
    """The request bodies held at once (all requests being answered) before the service answers 503; None: no
    budget beyond max_concurrency x max_upload_mb."""
    upload_timeout_s: float = 15.0
    """Seconds a request body may go without a byte before it is answered 408 (a stalled client frees its slot)."""
    decode_threads: int = 2
    max_megapixels: float = 64.0
    """The largest image decoded, in millions of pixels (checked from its header, before decoding); at most the
    runtime's own 64: a 64-MP RGB decode holds ~450 MB (the decoded image and its array; benchmarks/hostile.py),
    times the decoder threads."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


def check_settings(settings: ServeSettings) -> None:
    """Refuse settings that cannot work or would expose an open service: another host without a token."""
    if not is_loopback(settings.host) and not settings.token:
        raise EdgeKDError(f"--host {settings.host} would accept requests from other machines without a token: "
                          "set --token or EDGEKD_TOKEN (clients then send 'Authorization: Bearer TOKEN')")
    if settings.token is not None and len(settings.token) < 16:
        raise EdgeKDError("the API token must have at least 16 characters")
    odd = sorted({c for c in settings.token or "" if not ("!" <= c <= "~")})  # RFC 6750's token: printable ASCII
    if odd:  # a secret file's trailing newline, a space or a non-ASCII letter: no client could ever send it
        raise EdgeKDError(f"the API token holds {', '.join(repr(c) for c in odd)}: a bearer token is printable ASCII "
                          "without spaces (a token read from a file keeps its trailing newline: strip it)")
    for name, value in (("max_upload_mb", settings.max_upload_mb), ("max_inflight_mb", settings.max_inflight_mb),
                        ("upload_timeout", settings.upload_timeout_s), ("max_megapixels", settings.max_megapixels),
                        ("max_wait_ms", settings.max_wait_ms)):  # inf had ended in an OverflowError or no limit
        if value is not None and not math.isfinite(value):
            raise EdgeKDError(f"--{name.replace('_', '-')} {value}: not a finite number")
    for name in ("max_batch", "max_queue", "decode_threads"):
        if getattr(settings, name) < 1:
            raise EdgeKDError(f"--{name.replace('_', '-')} must be >= 1")
    if settings.max_queue < settings.max_batch:
        raise EdgeKDError(f"--max-queue {settings.max_queue} must be at least --max-batch {settings.max_batch}")
    if settings.max_concurrency is not None and settings.max_concurrency < 1:
        raise EdgeKDError("--max-concurrency must be >= 1")
    if settings.max_inflight_mb is not None and settings.max_inflight_mb < settings.max_upload_mb:
        raise EdgeKDError(f"--max-inflight-mb {settings.max_inflight_mb:g} must be at least --max-upload-mb "
                          f"{settings.max_upload_mb:g} (else the largest upload could never be answered)")
    if not 0 < settings.max_megapixels <= 64:
        raise EdgeKDError(f"--max-megapixels must be in (0, 64] (the runtime's own limit), got "
                          f"{settings.max_megapixels:g}")
    if not settings.upload_timeout_s > 0:
        raise EdgeKDError(f"--upload-timeout must be > 0 seconds, got {settings.upload_timeout_s}")
    if not 0 <= settings.max_wait_ms <= 10_000:
        raise EdgeKDError(f"--max-wait-ms must be in [0, 10000], got {settings.max_wait_ms}")
