"""The HTTP server around the app: uvicorn, with the limits a service facing unknown clients needs.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) and, with ``limit_concurrency``,
the connections and requests it takes at once (past it: 503). It has no deadline on a request's headers,
so ``HeaderDeadline`` adds one: a client that opens a connection and trickles its headers (slowloris)
is disconnected. A slow *body* is answered 408 by the app's ``BodyLimit``.
"""
from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0       # a request's headers must be complete this long after its connection or answer
MAX_CONNECTIONS = 256         # connections and requests at once; past it uvicorn answers 503
KEEP_ALIVE_S = 5              # an idle keep-alive connection is closed after this long
MAX_HEADER_BYTES = 64 * 2 ** 10


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers (``header_timeout``, seconds from
    the connection or from the previous answer)."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        """Close a connection whose request's headers are still incomplete (the client's side is IDLE:
        no whole request line and headers yet); one being answered is left alone."""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def server_config(app, host: str = "127.0.0.1", port: int = 8000, header_timeout_s: float = HEADER_TIMEOUT_S,
                  max_connections: int = MAX_CONNECTIONS, graceful_s: int | None = None) -> uvicorn.Config:
    """uvicorn's configuration of ``app`` with hier's connection limits (``hier serve`` and the tests run it).

    Args:
        app: the ASGI app (``create_app``).
        host, port: where to listen.
        header_timeout_s: a request's headers must be complete this long after the connection (or the
            previous answer) or the connection is closed.
        max_connections: connections and requests at once; past it, 503.
        graceful_s: how long a stop waits for the requests it accepted.

    Returns:
        The ``uvicorn.Config`` (``uvicorn.Server(config).run()``).
    """
    protocol = type("HierHeaderDeadline", (HeaderDeadline,), {"header_timeout": header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=max_connections,
                          timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          log_level="warning", timeout_graceful_shutdown=graceful_s)
