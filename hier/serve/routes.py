"""The routes: answers (``/predict``, ``/similar``, listing thumbnails), enrollment (admin), health and
metrics, each over the running ``Service`` (``service_of``)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from hier.artifact.store import stamp
from hier.drawing import hangul_webfont
from hier.enrollment import MAX_BASE_DROP
from hier.errors import HierError, check_number
from hier.fileio import Busy, locked
from hier.serve import schemas
from hier.serve.batching import Unavailable
from hier.serve.limits import ADMIN_TOKEN_ENV, FORM_LIMITS, AdminRoute
from hier.serve.service import Service, service_of
from hier.serve.thumbnails import THUMB_MAX_PIXELS, thumbnail_jpeg

PAGE = Path(__file__).with_name("static") / "index.html"
AUDIT_LOG = logging.getLogger("hier.audit")     # one JSON line per enrollment change: who, what, when
Served = Annotated[Service, Depends(service_of)]
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.get("/health/live", response_model=schemas.Live)
async def live(service: Served) -> dict:
    """The process answers (touches neither the model nor the disk)."""
    return {"status": "ok", "uptime_s": round(time.time() - service.started, 1)}


@router.get("/health/ready", response_model=schemas.Ready)
@router.get("/health", response_model=schemas.Ready)
async def ready(response: Response, service: Served) -> dict:
    """Ready to answer, and what is being served (503 when not). Never waits for the model: an
    artifact changed on disk is read here, in a worker thread, if no command holds it."""
    rec, batcher, problem = service.rec, service.batcher, None
    try:
        snap = await run_in_threadpool(rec.snapshot, False) if rec.stale else rec.loaded
    except HierError as e:
        snap, problem = rec.loaded, str(e)
    if service.model_lane.closed:
        problem = "shutting down"
    elif not batcher.alive:
        problem = "the model worker is not running"
    response.status_code = 200 if problem is None else 503
    return {"status": "ok" if problem is None else "not ready", "detail": problem, "artifact": str(rec.path),
            "classes": len(snap.taxonomy) if snap else None, "gallery": service.has_gallery(),
            "stale": problem is None and rec.stale, "uptime_s": round(time.time() - service.started, 1),
            "batches": batcher.batches, "batched_photos": batcher.items, "queue": service.model_lane.waiting,
            "batcher_restarts": batcher.restarts}


@router.api_route("/hangul.ttf", methods=["GET", "HEAD"], include_in_schema=False)
def hangul() -> Response:
    """NanumGothic's Hangul for the upload page (a browser fetches it once a page shows some), in a worker
    thread: cut from the font file on the first request."""
    return Response(hangul_webfont(), media_type="font/ttf", headers={"Cache-Control": "max-age=604800"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def prometheus(service: Served) -> Response:
    """Prometheus series (``hier.serve.metrics``), in a worker thread."""
    snap, metrics, fingerprinted = service.rec.loaded, service.metrics, service.fingerprinted
    if snap is not None:
        if fingerprinted[0] is not snap:
            fingerprinted[:] = snap, snap.net.fingerprint()
        metrics.classes.set(len(snap.taxonomy))
        metrics.artifact.info({"path": str(service.rec.path), "fingerprint": fingerprinted[1]})
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/predict", response_model=schemas.Answer)
async def predict(file: Annotated[UploadFile, File(description="A car photo (JPEG, PNG, WebP...)")],
                  service: Served, topk: Annotated[int, Query(ge=1, le=50)] = 5) -> dict:
    """Brand -> model -> fine class (years) with probabilities, and the top-k fine classes."""
    async def answer():
        return await service.batcher.submit((await service.photo(file), topk))
    return await service.model_lane.run(answer)     # admitted before the decode: overload is cheap


@router.post("/similar", response_model=schemas.Similar)
async def similar(file: Annotated[UploadFile, File(description="Query photo")], service: Served,
                  k: Annotated[int, Query(ge=1, le=100)] = 10, same_brand: bool = False) -> dict:
    """The k nearest listings of the artifact's gallery, with the sellers' columns and a thumbnail
    URL (never the server's file paths)."""
    rec = service.rec
    stamp(rec.path)                                      # a folder gone (being replaced): 503, not "no index"
    if not service.has_gallery():
        raise HTTPException(409, f"{rec.path} has no listing index; run `hier index build` first")

    async def answer():
        return await service.in_model_thread(rec.similar, await service.photo(file), k, same_brand)
    table = await service.model_lane.run(answer)
    table = table.drop(columns="image", errors="ignore")
    rows = table.astype(object).where(table.notna(), None).to_dict("records")   # numbers stay numbers
    for row in rows:
        row["hier_photo_url"] = photo_url(str(row["listing_id"]))
    return {"listings": rows}


def photo_url(listing_id: str) -> str:
    """Where a listing's thumbnail is served: ``/listings/<id>/photo`` with the id percent-encoded, or,
    for the ids ``.`` and ``..`` (dot segments, which every client normalises out of a path, encoded or
    not), ``/listings/photo?id=<id>``."""
    if listing_id in (".", ".."):
        return f"/listings/photo?id={quote(listing_id, safe='')}"
    return f"/listings/{quote(listing_id, safe='')}/photo"


def thumbnail_of(service: Service, listing_id: str) -> bytes:
    """In a thumbnail thread: the gallery's listings are held in memory (``Recognizer.gallery``)."""
    path = service.rec.listing_photo(listing_id) if service.has_gallery() else None
    if path is None:
        raise HTTPException(404, f"no photo for listing {listing_id!r}")
    try:
        st = os.stat(path)
    except OSError:
        raise HTTPException(404, f"the photo of listing {listing_id!r} is gone") from None
    data = thumbnail_jpeg(path, (st.st_ino, st.st_mtime_ns, st.st_size))
    if data is None:
        raise HTTPException(404, f"the photo of listing {listing_id!r} does not decode (damaged, or over "
                                 f"{THUMB_MAX_PIXELS / 1e6:.0f} megapixels)")
    return data


@router.get("/listings/photo", include_in_schema=False)
async def listing_photo_by_query(id: str, service: Served) -> Response:
    """``listing_photo`` for an id that cannot stand in a path (``photo_url``)."""
    return await listing_photo(id, service)


@router.get("/listings/{listing_id:path}/photo", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such listing, or its photo is "
                                                                                  "gone or does not decode"}})
async def listing_photo(listing_id: str, service: Served) -> Response:
    """A listing's photo as a 256 px JPEG thumbnail (only photos the gallery lists are served)."""
    loop = asyncio.get_running_loop()
    data = await service.thumb_lane.run(
        lambda: loop.run_in_executor(service.thumb_threads, thumbnail_of, service, listing_id))
    return Response(data, media_type="image/jpeg")


def enroll_route(max_enroll_files: int) -> APIRouter:
    """The admin router: ``/enroll`` accepting at most ``max_enroll_files`` photos, and
    ``DELETE /enroll/{class}``. Each change is one JSON line of the ``hier.audit`` log."""
    router = APIRouter(route_class=AdminRoute)

    @router.post("/enroll", form_limits={**FORM_LIMITS, "max_files": max_enroll_files}, response_model=schemas.Enrolled)
    async def enroll(request: Request,
                     files: Annotated[list[UploadFile], File(description="A few photos of the new class")],
                     name: Annotated[str, Form(alias="class", description="e.g. 신형모델_2025")],
                     service: Served,
                     brand: Annotated[str | None, Form()] = None, model: Annotated[str | None, Form()] = None,
                     years: Annotated[str | None, Form(description="e.g. 2025-2026")] = None,
                     add_shots: Annotated[bool, Form(description="the class is a known one: add the photos "
                                                     "to it")] = False,
                     max_base_drop: Annotated[float, Form(description="points of the known classes' held-out "
                                                          "accuracy the class may cost")] = MAX_BASE_DROP,
                     x_admin_token: Annotated[str | None, Header(description="must equal the service's "
                                                                 f"{ADMIN_TOKEN_ENV}; checked before the "
                                                                 "body is read")] = None) -> dict:
        """Add a class from uploaded photos (admin only: header ``X-Admin-Token`` must equal the
        service's ``HIER_ADMIN_TOKEN``; at most ``max_enroll_files`` photos). Answers include the class
        from the next request on."""
        check_number("--max-base-drop", max_base_drop, 0, 100)
        shots = [await service.shot(f) for f in files]          # every shot checked before anything changes
        return await _edit(request, service, "enroll", name, lambda rec: rec.enroll(
            name, shots, brand, model, years, add_shots=add_shots, max_base_drop=max_base_drop).to_dict())

    @router.delete("/enroll/{name:path}", response_model=schemas.Unenrolled)
    async def unenroll(request: Request, name: str, service: Served,
                       x_admin_token: Annotated[str | None, Header(description="must equal the service's "
                                                                   f"{ADMIN_TOKEN_ENV}")] = None) -> dict:
        """Remove an enrolled class, or the shots added to a known class (admin only, as ``/enroll``)."""
        return await _edit(request, service, "unenroll", name, lambda rec: rec.unenroll(name).to_dict())

    return router


async def _edit(request: Request, service: Service, action: str, name: str, change) -> dict:
    """``change(recognizer)`` in the model thread under the artifact's lock (503 while another command
    writes it; the model thread never waits for a writer), and its audit line, done or refused."""
    rec = service.rec

    def edit() -> dict:
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(locked(rec.path, timeout=0))
            except Busy:
                raise Unavailable(f"{rec.path} is being written by another command; try again when it ends",
                                  "busy") from None
            return change(rec)
    line = {"time": round(time.time(), 3), "action": action, "class": name,
            "request_id": getattr(request.state, "request_id", None),
            "client": request.client.host if request.client else None}
    try:
        done = await service.model_lane.run(lambda: service.in_model_thread(edit), bounded=False)
    except Exception as e:
        AUDIT_LOG.info(json.dumps({**line, "done": False, "detail": str(e)[:300]}, ensure_ascii=False))
        raise
    AUDIT_LOG.info(json.dumps({**line, "done": True, "shots": done.get("added"), "classes": done["classes"]},
                              ensure_ascii=False))
    return done
