"""The HTTP service: ``create_app(artifact)`` -> a FastAPI app over one ``Recognizer`` (the routes in
``routes``, the state they share in ``service``, admission and batching in ``batching``, body limits in
``limits``).

The model is loaded once, at start-up, and used from one worker thread, so requests never race on it.
Concurrent ``/predict`` requests are micro-batched: photos that arrive within a few milliseconds of
each other share one forward pass. Uploads are checked by content (``decode_upload``), never by name
or declared type, and refused with a 4xx before they reach the model; a body stops being read once it
passes the limit (Content-Length given or not), and ``/enroll``'s token is checked before its body is
read. The recognizer reloads by itself when the artifact changes on disk, so a class enrolled through
``/enroll`` or the CLI is answered at once; while another command holds the artifact's lock the
service keeps answering with the version it holds.

Under load: at most ``max_queue`` requests wait for the model (and as many for thumbnails), each is
answered within ``timeout_s``; past either the answer is 503 with ``Retry-After``, never a hang.
``/health/live`` never touches the model, ``/health/ready`` (and ``/health``) never waits for it.
Shutdown stops admitting and drains what was accepted. ``/metrics`` serves Prometheus series, and
every request gets one JSON line on the ``hier.access`` logger (``hier.serve.metrics``).
"""
from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse

from hier.errors import ArtifactGone, HierError, NotFound, check_number
from hier.recognizer import Recognizer
from hier.serve.batching import Unavailable
from hier.serve.limits import FORM_LIMITS, FORM_OVERHEAD, BodyLimit
from hier.serve.metrics import Observe
from hier.serve.routes import enroll_route, router
from hier.serve.service import Service
from hier.version import __version__

RETRY_AFTER_S = 1


def create_app(artifact: str | Path, max_upload_mb: float = 10.0, max_batch: int = 16, wait_ms: float = 5.0,
               recognizer: Recognizer | None = None, *, max_queue: int = 64, timeout_s: float = 30.0,
               max_enroll_files: int = 64, body_timeout_s: float = 60.0, min_body_rate: float = 16 * 2 ** 10) -> FastAPI:
    """The service for one artifact.

    Args:
        artifact: the artifact (or ensemble) folder.
        max_upload_mb: the limit of each uploaded file (and of a request's body: one file, or
            ``max_enroll_files`` for ``/enroll``).
        max_batch, wait_ms: photos of concurrent requests that share one forward pass, and the wait for them.
        recognizer: a ``Recognizer`` to serve instead of opening ``artifact``.
        max_queue, timeout_s: requests that may wait for the model, and how long each may wait (503 past).
        max_enroll_files: photos one ``/enroll`` may upload.
        body_timeout_s, min_body_rate: a request's body must arrive within this many seconds, and (after
            5 s) at this many bytes a second at least; else 408 (a slow client holds no connection).

    Returns:
        The FastAPI app (run it with uvicorn; ``hier serve`` does).

    Raises:
        HierError: a limit out of range, or ``artifact`` not an artifact.

    Example:
        >>> uvicorn.run(create_app("runs/x"), host="127.0.0.1", port=8000)
    """
    check_number("--max-upload-mb", max_upload_mb, 0.001, 4096)
    check_number("--max-batch", max_batch, 1, 1024, integer=True)
    check_number("wait_ms", wait_ms, 0, 1000)
    check_number("--max-queue", max_queue, 1, 100_000, integer=True)
    check_number("--timeout", timeout_s, 0.1, 3600)
    check_number("--max-enroll-files", max_enroll_files, 1, 10_000, integer=True)
    check_number("--body-timeout", body_timeout_s, 0.1, 3600)
    check_number("min_body_rate", min_body_rate, 1)
    service = Service(recognizer or Recognizer(artifact), max_upload_mb, max_batch, wait_ms, max_queue, timeout_s,
                      max_enroll_files)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        if service.has_gallery():
            with contextlib.suppress(HierError):               # read at the first /similar otherwise
                await service.in_model_thread(service.rec.gallery)
        service.batcher.start()
        try:
            yield
        finally:
            await service.stop()

    # /docs and /redoc from files installed with hier (fastapi-offline: Swagger UI 5, ReDoc), not a CDN
    app = FastAPIOffline(title="hier", version=__version__, lifespan=lifespan, form_limits=FORM_LIMITS,
                  description="Brand, model and year of a car photo (never contradicting each other), "
                              "similar listings, and few-shot enrollment of new classes.")
    app.state.service = service
    app.state.batcher, app.state.metrics = service.batcher, service.metrics
    app.state.lanes = (service.model_lane, service.thumb_lane)
    app.add_middleware(BodyLimit, default=service.limit + FORM_OVERHEAD,
                       limits={"/enroll": max_enroll_files * service.limit + FORM_OVERHEAD},
                       deadline_s=body_timeout_s, min_rate=min_body_rate)
    app.add_middleware(Observe, metrics=service.metrics)        # outermost: sees every answer

    @app.exception_handler(HierError)
    async def hier_error(_: Request, e: HierError):
        if isinstance(e, ArtifactGone):         # not the client's mistake: retry once it is back
            service.metrics.refused.labels("artifact_gone").inc()
            return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"detail": str(e)}, status_code=404 if isinstance(e, NotFound) else 400)

    @app.exception_handler(Unavailable)
    async def unavailable(_: Request, e: Unavailable):
        service.metrics.refused.labels(e.reason).inc()
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    app.include_router(router)
    app.include_router(enroll_route(max_enroll_files))
    return app
