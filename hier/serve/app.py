"""The HTTP service: ``create_app(artifact)`` -> a FastAPI app over one ``Recognizer``.

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

import asyncio
import contextlib
import hmac
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import numpy as np
from fastapi import (
    APIRouter,
    FastAPI,
    File,
    Form,
    Header,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hier.fileio import locked
from hier.data import NOT_IMAGE, TOO_LARGE, UNREADABLE, UploadRefused, decode_upload, pil_rgb
from hier.enroll import MAX_BASE_DROP
from hier.errors import HierError, check_number
from hier.index import GALLERY
from hier.recognizer import Recognizer
from hier.serve.metrics import Metrics, Observe

ADMIN_TOKEN_ENV = "HIER_ADMIN_TOKEN"     # /enroll is refused unless requests carry this variable's value
PAGE = Path(__file__).with_name("static") / "index.html"
REFUSED_STATUS = {NOT_IMAGE: 415, UNREADABLE: 400, TOO_LARGE: 413}
FORM_OVERHEAD = 256 * 2 ** 10           # multipart framing and the text fields, beyond the files
FORM_LIMITS = {"max_files": 1, "max_fields": 16, "max_part_size": 16 * 2 ** 10}
RETRY_AFTER_S = 1
THUMB = 256                              # thumbnail side, pixels
THUMB_MAX_PIXELS = 50_000_000            # after the reduced-scale JPEG decode; larger photos get no thumbnail
log = logging.getLogger("hier.serve")


class Unavailable(Exception):
    """Answered 503 with ``Retry-After``: the service is full, slow or stopping, and the client may retry.
    ``reason`` labels the ``hier_refused`` series."""

    def __init__(self, detail: str, reason: str):
        super().__init__(detail)
        self.reason = reason


class MicroBatcher:
    """Gathers concurrent requests into one call of ``fn(items) -> results``: after the first item it
    waits up to ``wait_ms`` for more, up to ``max_batch``, then runs ``fn`` in the model's thread.

    ``start`` runs it as a task that is restarted if it ever dies (``restarts`` counts it; not when it
    dies again at once, over and over: then ``alive`` stays False and requests get 503), and the
    requests of the batch in hand then get an error at once instead of waiting forever."""

    def __init__(self, fn, executor: ThreadPoolExecutor, max_batch: int = 16, wait_ms: float = 5.0,
                 on_restart: Callable[[], None] | None = None):
        self.fn, self.executor, self.max_batch, self.wait = fn, executor, max_batch, wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = self.items = self.restarts = 0
        self.task: asyncio.Task | None = None
        self.on_restart, self._stopping, self._started_at = on_restart, False, 0.0

    def start(self) -> None:
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self.task = loop.create_task(self.run(), name="hier-batcher")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        why = "cancelled" if error is None else repr(error)
        if asyncio.get_running_loop().time() - self._started_at < 0.1 and self.restarts:
            log.error("the micro-batcher keeps stopping (%s); not restarting it again", why, exc_info=error)
            return
        log.error("the micro-batcher stopped (%s); restarting it", why, exc_info=error)
        self.restarts += 1
        if self.on_restart:
            self.on_restart()
        self.start()

    async def stop(self) -> None:
        self._stopping = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, item):
        if not self.alive:
            raise Unavailable("the model worker is not running", "not_running")
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = []
            try:
                batch.append(await self.queue.get())
                deadline = loop.time() + self.wait
                while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), left))
                    except asyncio.TimeoutError:
                        break
                batch = [(item, f) for item, f in batch if not f.done()]     # clients that gave up
                if not batch:
                    continue
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} answers for {len(batch)} photos")
            except BaseException as e:        # handed to every waiting request, then re-raised if fatal
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e if isinstance(e, Exception) else
                                        Unavailable("the model worker stopped; try again", "not_running"))
                if isinstance(e, Exception):
                    continue
                raise
            self.batches, self.items = self.batches + 1, self.items + len(batch)
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


class Lane:
    """Admission to one worker (the model thread, the thumbnail threads): at most ``limit`` requests
    wait for it, each is answered within ``timeout_s``, none is admitted once ``drain`` began; else
    ``Unavailable``. ``depth``: the gauge of the requests waiting."""

    def __init__(self, name: str, limit: int, timeout_s: float, depth):
        self.name, self.limit, self.timeout_s, self.depth = name, limit, timeout_s, depth
        self.waiting, self.closed = 0, False

    async def run(self, work: Callable[[], Awaitable], bounded: bool = True):
        """``await work()`` once admitted (within ``timeout_s`` if ``bounded``)."""
        if self.closed:
            raise Unavailable("the service is shutting down", "shutdown")
        if self.waiting >= self.limit:
            raise Unavailable(f"{self.waiting} requests are waiting for the {self.name}; try again shortly",
                              "queue_full")
        self.waiting += 1
        self.depth.set(self.waiting)
        try:
            return await asyncio.wait_for(work(), self.timeout_s if bounded else None)
        except asyncio.TimeoutError:
            raise Unavailable(f"not answered within {self.timeout_s:g} s (the service is overloaded); try again",
                              "timeout") from None
        finally:
            self.waiting -= 1
            self.depth.set(self.waiting)

    async def drain(self, within_s: float) -> None:
        """Admit no more, and wait (up to ``within_s``) for the admitted requests to be answered."""
        self.closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self.waiting and loop.time() < deadline:
            await asyncio.sleep(0.02)


class BodyTooLarge(HTTPException):
    """413, raised while a body is read: an HTTPException, so FastAPI's form parsing passes it on as it
    is (any other error there becomes a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the {limit / 2 ** 20:.3g} MB limit")


class BodyLimit:
    """Stops reading a request body once it passes its limit, and answers 413 (JSON, as every refusal
    here): a declared Content-Length over the limit before a byte is read, a chunked body (no
    Content-Length) as soon as the bytes received pass it. ``limits``: bytes by path, ``default`` else.
    (FastAPI's own ``max_body_size`` answers a declared length in plain text.)"""

    def __init__(self, app: ASGIApp, default: int, limits: dict[str, int]):
        self.app, self.default, self.limits = app, default, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(BodyTooLarge(limit), scope, receive, send)
            return
        received, started = 0, False

        async def receive_() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_, send_)
        except BodyTooLarge as e:           # raised where no handler answered it
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
        return 401, "a valid X-Admin-Token header is needed to enroll"
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


def create_app(artifact: str | Path, max_upload_mb: float = 10.0, max_batch: int = 16, wait_ms: float = 5.0,
               recognizer: Recognizer | None = None, *, max_queue: int = 64, timeout_s: float = 30.0,
               max_enroll_files: int = 64) -> FastAPI:
    """The service for one artifact. ``max_upload_mb`` bounds each uploaded file (and a request's body:
    one file, or ``max_enroll_files`` for /enroll); ``max_queue`` and ``timeout_s`` bound the waiting."""
    check_number("--max-upload-mb", max_upload_mb, 0.001, 4096)
    check_number("--max-batch", max_batch, 1, 1024, integer=True)
    check_number("wait_ms", wait_ms, 0, 1000)
    check_number("--max-queue", max_queue, 1, 100_000, integer=True)
    check_number("--timeout", timeout_s, 0.1, 3600)
    check_number("--max-enroll-files", max_enroll_files, 1, 10_000, integer=True)
    rec = recognizer or Recognizer(artifact)
    limit = int(max_upload_mb * 2 ** 20)
    metrics = Metrics()
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hier-model")
    thumb_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hier-thumb")
    model_lane = Lane("model", max_queue, timeout_s, metrics.queue_depth.labels("model"))
    thumb_lane = Lane("thumbnails", max_queue, timeout_s, metrics.queue_depth.labels("thumbnails"))
    started = time.time()

    def predict_batch(items: list[tuple[np.ndarray, int]]) -> list[dict]:
        metrics.batch_size.observe(len(items))
        results = rec.predict([image for image, _ in items], topk=max(k for _, k in items))
        return [{**_answer(r), "topk": r.topk[:k]} for r, (_, k) in zip(results, items)]

    batcher = MicroBatcher(predict_batch, model_thread, max_batch, wait_ms, on_restart=metrics.restarts.inc)

    async def in_model_thread(fn, *args):
        """Every use of the model runs in its one thread: no two requests race on it."""
        return await asyncio.get_running_loop().run_in_executor(model_thread, fn, *args)

    def has_gallery() -> bool:
        return (rec.path / GALLERY / "index.faiss").is_file()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await in_model_thread(rec.reload)                       # load once, up front
        if has_gallery():
            with contextlib.suppress(HierError):               # read at the first /similar otherwise
                await in_model_thread(rec.gallery)
        batcher.start()
        try:
            yield
        finally:                                                # answer what was accepted, then stop
            await asyncio.gather(model_lane.drain(timeout_s + 1), thumb_lane.drain(timeout_s + 1))
            await batcher.stop()
            model_thread.shutdown(wait=False, cancel_futures=True)
            thumb_threads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hier", version="0.1.0", lifespan=lifespan, form_limits=FORM_LIMITS,
                  description="Brand, model and year of a car photo (never contradicting each other), "
                              "similar listings, and few-shot enrollment of new classes.")
    app.state.batcher, app.state.metrics, app.state.lanes = batcher, metrics, (model_lane, thumb_lane)
    app.add_middleware(BodyLimit, default=limit + FORM_OVERHEAD,
                       limits={"/enroll": max_enroll_files * limit + FORM_OVERHEAD})
    app.add_middleware(Observe, metrics=metrics)                # outermost: sees every answer

    @app.exception_handler(HierError)
    async def hier_error(_: Request, e: HierError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(Unavailable)
    async def unavailable(_: Request, e: Unavailable):
        metrics.refused.labels(e.reason).inc()
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def photo(upload: UploadFile) -> np.ndarray:
        """The upload decoded (in a worker thread, never on the event loop) or a 4xx."""
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"{upload.filename or 'upload'} is over the {max_upload_mb:g} MB limit")
        loaded = rec.loaded                 # uploads decode at reduced scale down to the model's input
        try:
            return await run_in_threadpool(decode_upload, data, upload.filename or "upload",
                                           loaded.net.cfg.img_size if loaded else None)
        except UploadRefused as e:
            raise HTTPException(REFUSED_STATUS[e.reason], str(e)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health/live")
    async def live() -> dict:
        """The process answers (touches neither the model nor the disk)."""
        return {"status": "ok", "uptime_s": round(time.time() - started, 1)}

    @app.get("/health/ready")
    @app.get("/health")
    async def ready(response: Response) -> dict:
        """Ready to answer, and what is being served (503 when not). Never waits for the model: an
        artifact changed on disk is read here, in a worker thread, if no command holds it."""
        problem = None
        try:
            snap = await run_in_threadpool(rec.snapshot, False) if rec.stale else rec.loaded
        except HierError as e:
            snap, problem = rec.loaded, str(e)
        if model_lane.closed:
            problem = "shutting down"
        elif not batcher.alive:
            problem = "the model worker is not running"
        response.status_code = 200 if problem is None else 503
        return {"status": "ok" if problem is None else "not ready", "detail": problem, "artifact": str(rec.path),
                "classes": len(snap.taxonomy) if snap else None, "gallery": has_gallery(),
                "stale": problem is None and rec.stale, "uptime_s": round(time.time() - started, 1),
                "batches": batcher.batches, "batched_photos": batcher.items, "queue": model_lane.waiting,
                "batcher_restarts": batcher.restarts}

    fingerprinted: list = [None, None]           # (snapshot, its fingerprint): computed once per version

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        """Prometheus series (``hier.serve.metrics``), in a worker thread."""
        snap = rec.loaded
        if snap is not None:
            if fingerprinted[0] is not snap:
                fingerprinted[:] = snap, snap.net.fingerprint()
            metrics.classes.set(len(snap.taxonomy))
            metrics.artifact.info({"path": str(rec.path), "fingerprint": fingerprinted[1]})
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File(description="A car photo (JPEG, PNG, WebP...)")],
                      topk: Annotated[int, Query(ge=1, le=50)] = 5) -> dict:
        """Brand -> model -> fine class (years) with probabilities, and the top-k fine classes."""
        async def answer():
            return await batcher.submit((await photo(file), topk))
        return await model_lane.run(answer)             # admitted before the decode: overload is cheap

    @app.post("/similar")
    async def similar(file: Annotated[UploadFile, File(description="Query photo")],
                      k: Annotated[int, Query(ge=1, le=100)] = 10, same_brand: bool = False) -> dict:
        """The k nearest listings of the artifact's gallery, with the sellers' columns and a thumbnail
        URL (never the server's file paths)."""
        if not has_gallery():
            raise HTTPException(409, f"{rec.path} has no listing index; run `hier index build` first")

        async def answer():
            return await in_model_thread(rec.similar, await photo(file), k, same_brand)
        table = await model_lane.run(answer)
        table = table.drop(columns="image", errors="ignore")
        rows = table.astype(object).where(table.notna(), None).to_dict("records")
        for row in rows:
            row["photo_url"] = f"/listings/{quote(str(row['listing_id']), safe='')}/photo"
        return {"listings": rows}

    def thumbnail_of(listing_id: str) -> bytes:
        """In a thumbnail thread: the gallery's listings are held in memory (``Recognizer.gallery``)."""
        path = rec.listing_photo(listing_id) if has_gallery() else None
        if path is None:
            raise HTTPException(404, f"no photo for listing {listing_id!r}")
        try:
            st = os.stat(path)
        except OSError:
            raise HTTPException(404, f"the photo of listing {listing_id!r} is gone") from None
        data = _thumbnail(path, (st.st_ino, st.st_mtime_ns, st.st_size))
        if data is None:
            raise HTTPException(404, f"the photo of listing {listing_id!r} does not decode (damaged, or over "
                                     f"{THUMB_MAX_PIXELS / 1e6:.0f} megapixels)")
        return data

    @app.get("/listings/{listing_id:path}/photo", include_in_schema=False)
    async def listing_photo(listing_id: str) -> Response:
        """A listing's photo as a 256 px JPEG thumbnail (only photos the gallery lists are served)."""
        loop = asyncio.get_running_loop()
        data = await thumb_lane.run(lambda: loop.run_in_executor(thumb_threads, thumbnail_of, listing_id))
        return Response(data, media_type="image/jpeg")

    admin = APIRouter(route_class=AdminRoute)

    @admin.post("/enroll", form_limits={**FORM_LIMITS, "max_files": max_enroll_files})
    async def enroll(files: Annotated[list[UploadFile], File(description="A few photos of the new class")],
                     name: Annotated[str, Form(alias="class", description="e.g. 신형모델_2025")],
                     brand: Annotated[str | None, Form()] = None, model: Annotated[str | None, Form()] = None,
                     years: Annotated[str | None, Form(description="e.g. 2025-2026")] = None,
                     max_base_drop: Annotated[float, Form(description="points of the known classes' held-out "
                                                          "accuracy the class may cost")] = MAX_BASE_DROP,
                     x_admin_token: Annotated[str | None, Header(description="must equal the service's "
                                                                 f"{ADMIN_TOKEN_ENV}; checked before the "
                                                                 "body is read")] = None) -> dict:
        """Add a class from uploaded photos (admin only: header ``X-Admin-Token`` must equal the
        service's ``HIER_ADMIN_TOKEN``; at most ``max_enroll_files`` photos). Answers include the class
        from the next request on."""
        check_number("--max-base-drop", max_base_drop, 0, 100)
        shots = [await photo(f) for f in files]                 # every shot checked before anything changes

        def enroll_shots() -> dict:                             # in the model thread, however long it takes
            with contextlib.ExitStack() as held, tempfile.TemporaryDirectory() as tmp:
                try:                                            # the model thread never waits for a writer
                    held.enter_context(locked(rec.path, timeout=0))
                except HierError:
                    raise Unavailable(f"{rec.path} is being written by another command; try again when it "
                                      "ends", "busy") from None
                paths = [Path(tmp) / f"shot{i}.png" for i in range(len(shots))]
                for path, image in zip(paths, shots):
                    Image.fromarray(image).save(path)
                return rec.enroll(name, paths, brand, model, years, max_base_drop=max_base_drop).to_dict()
        return await model_lane.run(lambda: in_model_thread(enroll_shots), bounded=False)

    app.include_router(admin)
    return app


@lru_cache(maxsize=1024)
def _thumbnail(path: str, stamp: tuple) -> bytes | None:
    """The photo as a THUMB px JPEG (None when it no longer decodes or is too large), cached by the
    file's ``stamp``. A JPEG decodes at reduced scale (PIL draft: a 9000 x 9000 photo at 1125 x 1125);
    the pixel count is checked after that, before any pixel is decoded."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB, THUMB))
            if im.width * im.height > THUMB_MAX_PIXELS:
                return None
            im = Image.fromarray(pil_rgb(im))      # the one decoder: upright, 16-bit photos scaled, not clipped
            im.thumbnail((THUMB, THUMB))
            buf = BytesIO()
            im.save(buf, "JPEG", quality=85)
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


def _answer(prediction) -> dict:
    out = prediction.to_dict()
    out.pop("image")
    return out
