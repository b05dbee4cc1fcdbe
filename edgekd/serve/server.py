"""`edgekd serve`: the app on uvicorn, localhost unless a token guards it, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

from edgekd.errors import EdgeKDError
from edgekd.runtime import Runner
from edgekd.serve.app import create_app
from edgekd.serve.settings import ServeSettings, check_settings

GRACEFUL_SECONDS = 30
"""How long a shutdown waits for in-flight requests before it cancels them."""


def check_port_free(host: str, port: int) -> None:
    """Bind every address `host` resolves to, the way uvicorn's asyncio server will (SO_REUSEADDR, IPv6 sockets
    v6-only), and let them go: a port in use is a one-line error before the model is loaded, not uvicorn's log
    lines after it."""
    try:
        addresses = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (OSError, UnicodeError) as err:
        raise EdgeKDError(f"--host {host}: cannot be resolved ({getattr(err, 'strerror', None) or err})") from None
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as err:
            raise EdgeKDError(f"--host {host} --port {port}: cannot listen on {address[0]} "
                              f"({err.strerror or err})") from None


@contextlib.contextmanager
def signals_absorbed():
    """uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal for the handler it
    found: a no-op one here, so a graceful shutdown ends the process with status 0."""
    saved = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class CancellationUnlogged(logging.Filter):
    """After a forced exit (a second SIGINT), drops uvicorn's log records of the cancelled app lifespan: they had
    put Starlette's CancelledError traceback in the log as an error."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.server.force_exit:
            return True
        cancelled = record.exc_info is not None and isinstance(record.exc_info[1], asyncio.CancelledError)
        return not (cancelled or record.getMessage().rstrip().endswith("CancelledError"))


def serve(runner: Runner, settings: ServeSettings, log_level: str = "info") -> None:
    """Warm up every padded batch size, then serve until SIGTERM/SIGINT; in-flight requests finish first. A second
    SIGINT stops at once (uvicorn's forced exit), without answering them: KeyboardInterrupt (exit 130 from the
    CLI), not the status 0 of a graceful shutdown."""
    import uvicorn

    check_settings(settings)
    app = create_app(runner, settings)  # its lifespan warms every padded batch size before serving
    # No uvicorn connection limit: it counted idle and half-sent connections, so a few of them locked every client
    # out; the app bounds the requests it answers (RequestLimit) and the time a body may take (BodyLimit).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SECONDS, lifespan="on", server_header=False)
    server, log = uvicorn.Server(config), logging.getLogger("uvicorn.error")
    quiet = CancellationUnlogged(server)
    log.addFilter(quiet)
    try:
        with signals_absorbed():
            server.run()
    finally:
        log.removeFilter(quiet)
    if server.force_exit:  # the signal again, for the handler the process has (the CLI's records and reports it)
        signal.raise_signal(signal.SIGINT)
        raise KeyboardInterrupt
