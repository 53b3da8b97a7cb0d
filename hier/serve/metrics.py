"""What the service reports about itself: Prometheus series at ``/metrics`` and one JSON access-log line
per request (logger ``hier.access``), both from one outermost ASGI layer (``Observe``), which also gives
every request an id (the client's ``X-Request-ID`` when it is a plain token, else a new one), returned in
the ``X-Request-ID`` header and written in the request's log lines.

Each app has its own ``CollectorRegistry``, so several apps in one process (tests, a mounted app) never
share or clash on series. Routes are labelled by their template (``/listings/{listing_id:path}/photo``),
never by the raw path, so a client cannot grow the series without bound.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOG = logging.getLogger("hier.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")      # a client's id is kept only if it is a plain token
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The service's series, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hier_requests", "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("hier_request_seconds", "Time to answer a request, by route template",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("hier_batch_size", "Photos answered per forward pass (micro-batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("hier_queue_depth", "Requests admitted and not yet answered, by worker",
                                 ["worker"], registry=r)
        self.refused = Counter("hier_refused", "Requests answered 503, by reason", ["reason"], registry=r)
        self.restarts = Counter("hier_batcher_restarts", "Times the micro-batcher died and was restarted",
                                registry=r)
        self.classes = Gauge("hier_artifact_classes", "Classes the served artifact answers", registry=r)
        self.artifact = Info("hier_artifact", "The served artifact: folder and fingerprint of its weights",
                             registry=r)


class Observe:
    """Outermost ASGI layer: per HTTP request, the metrics and one JSON access-log line; and
    ``Connection: close`` on an answer sent before the request's body was read to its end (a refusal:
    413, 401...), so the server reads no more of a body nobody will use."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        body_read = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers

        async def receive_() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read = True
            return message

        async def send_(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode())] + ([] if body_read else [(b"connection", b"close")])
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive_, send_)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if ACCESS_LOG.isEnabledFor(logging.INFO):
                client = scope.get("client")
                ACCESS_LOG.info(json.dumps({
                    "time": round(time.time(), 3), "method": scope["method"], "path": scope["path"],
                    "route": route, "status": status, "ms": round(1000 * seconds, 2),
                    "client": client[0] if client else None, "request_id": request_id}, ensure_ascii=False))
