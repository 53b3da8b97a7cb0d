"""The HTTP service: ``create_app(artifact)`` -> a FastAPI app over one ``Recognizer``.

The model is loaded once, at start-up, and used from one worker thread, so requests never race on it.
Concurrent ``/predict`` requests are micro-batched: photos that arrive within a few milliseconds of
each other share one forward pass. Uploads are checked by content (``decode_upload``), never by name
or declared type, and refused with a 4xx before they reach the model. The recognizer reloads by itself
when the artifact changes on disk, so a class enrolled through ``/enroll`` or the CLI is answered at once.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from io import BytesIO
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from hier.data import NOT_IMAGE, TOO_LARGE, UNREADABLE, UploadRefused, decode_upload
from hier.enroll import MAX_BASE_DROP
from hier.errors import HierError
from hier.index import GALLERY, Gallery
from hier.recognizer import Recognizer

ADMIN_TOKEN_ENV = "HIER_ADMIN_TOKEN"     # /enroll is refused unless requests carry this variable's value
PAGE = Path(__file__).with_name("static") / "index.html"
REFUSED_STATUS = {NOT_IMAGE: 415, UNREADABLE: 400, TOO_LARGE: 413}


class MicroBatcher:
    """Gathers concurrent requests into one call of ``fn(items) -> results``: after the first item it
    waits up to ``wait_ms`` for more, up to ``max_batch``, then runs ``fn`` in the model's thread."""

    def __init__(self, fn, executor: ThreadPoolExecutor, max_batch: int = 16, wait_ms: float = 5.0):
        self.fn, self.executor, self.max_batch, self.wait = fn, executor, max_batch, wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = self.items = 0

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(item, f) for item, f in batch if not f.cancelled()]     # clients that gave up
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
            except Exception as e:            # noqa: BLE001 - handed to every waiting request
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches, self.items = self.batches + 1, self.items + len(batch)
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


def create_app(artifact: str | Path, max_upload_mb: float = 10.0, max_batch: int = 16, wait_ms: float = 5.0,
               recognizer: Recognizer | None = None) -> FastAPI:
    """The service for one artifact. ``max_upload_mb`` bounds each uploaded file (and a request's body)."""
    rec = recognizer or Recognizer(artifact)
    limit = int(max_upload_mb * 2 ** 20)
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hier-model")
    started = time.time()
    img_size = None            # the model's input size: uploads decode at reduced scale down to it

    def predict_batch(items: list[tuple[np.ndarray, int]]) -> list[dict]:
        results = rec.predict([image for image, _ in items], topk=max(k for _, k in items))
        return [{**_answer(r), "topk": r.topk[:k]} for r, (_, k) in zip(results, items)]

    batcher = MicroBatcher(predict_batch, model_thread, max_batch, wait_ms)

    async def in_model_thread(fn, *args):
        """Every use of the model runs in its one thread: no two requests race on it."""
        return await asyncio.get_running_loop().run_in_executor(model_thread, fn, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal img_size
        await in_model_thread(rec.reload)                       # load once, up front
        img_size = rec.net.cfg.img_size
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        model_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hier", version="0.1.0", lifespan=lifespan,
                  description="Brand, model and year of a car photo (never contradicting each other), "
                              "similar listings, and few-shot enrollment of new classes.")

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        """Refuse a body declared larger than the limit before reading it (files are checked again)."""
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limit * 8 + 2 ** 20:   # /enroll takes several photos
            return JSONResponse({"detail": f"request body over {8 * max_upload_mb:g} MB"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(HierError)
    async def hier_error(_: Request, e: HierError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    async def photo(upload: UploadFile) -> np.ndarray:
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"{upload.filename or 'upload'} is over the {max_upload_mb:g} MB limit")
        try:
            return decode_upload(data, upload.filename or "upload", img_size)
        except UploadRefused as e:
            raise HTTPException(REFUSED_STATUS[e.reason], str(e)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        """Liveness plus what is being served."""
        gallery = rec.path / GALLERY / "listings.csv"
        classes = await in_model_thread(lambda: len(rec.taxonomy))
        return {"status": "ok", "artifact": str(rec.path), "classes": classes,
                "gallery": bool(gallery.is_file()), "uptime_s": round(time.time() - started, 1),
                "batches": batcher.batches, "batched_photos": batcher.items}

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File(description="A car photo (JPEG, PNG, WebP...)")],
                      topk: Annotated[int, Query(ge=1, le=50)] = 5) -> dict:
        """Brand -> model -> fine class (years) with probabilities, and the top-k fine classes."""
        return await batcher.submit((await photo(file), topk))

    @app.post("/similar")
    async def similar(file: Annotated[UploadFile, File(description="Query photo")],
                      k: Annotated[int, Query(ge=1, le=100)] = 10, same_brand: bool = False) -> dict:
        """The k nearest listings of the artifact's gallery, with the sellers' columns."""
        image = await photo(file)
        if not (rec.path / GALLERY / "index.faiss").is_file():
            raise HTTPException(409, f"{rec.path} has no listing index; run `hier index build` first")
        table = await in_model_thread(rec.similar, image, k, same_brand)
        rows = table.astype(object).where(table.notna(), None).to_dict("records")
        for row in rows:
            row["photo_url"] = f"/listings/{row['listing_id']}/photo"
        return {"listings": rows}

    @app.get("/listings/{listing_id:path}/photo", include_in_schema=False)
    async def listing_photo(listing_id: str) -> Response:
        """A listing's photo as a 256 px JPEG thumbnail (only photos the gallery lists are served)."""
        listings = await in_model_thread(lambda: Gallery.load(rec.path).listings)
        match = listings.loc[listings["listing_id"] == listing_id, "image"]
        if match.empty or not Path(match.iloc[0]).is_file():
            raise HTTPException(404, f"no photo for listing {listing_id!r}")
        with Image.open(match.iloc[0]) as im:
            im.draft("RGB", (256, 256))
            im = im.convert("RGB")
            im.thumbnail((256, 256))
            buf = BytesIO()
            im.save(buf, "JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg")

    @app.post("/enroll")
    async def enroll(files: Annotated[list[UploadFile], File(description="A few photos of the new class")],
                     name: Annotated[str, Form(alias="class", description="e.g. 신형모델_2025")],
                     brand: Annotated[str | None, Form()] = None, model: Annotated[str | None, Form()] = None,
                     years: Annotated[str | None, Form(description="e.g. 2025-2026")] = None,
                     max_base_drop: Annotated[float, Form(description="points of the known classes' held-out "
                                                          "accuracy the class may cost")] = MAX_BASE_DROP,
                     x_admin_token: Annotated[str | None, Header()] = None) -> dict:
        """Add a class from uploaded photos (admin only: header ``X-Admin-Token`` must equal the
        service's ``HIER_ADMIN_TOKEN``). Answers include the class from the next request on."""
        token = os.environ.get(ADMIN_TOKEN_ENV)
        if not token:
            raise HTTPException(403, f"enrollment is disabled: start the service with {ADMIN_TOKEN_ENV} set")
        if not x_admin_token or not hmac.compare_digest(x_admin_token.encode(), token.encode()):
            raise HTTPException(401, "a valid X-Admin-Token header is needed to enroll")
        shots = [await photo(f) for f in files]                 # every shot checked before anything changes
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, image in enumerate(shots):
                paths.append(Path(tmp) / f"shot{i}.png")
                Image.fromarray(image).save(paths[-1])
            return await in_model_thread(lambda: rec.enroll(name, paths, brand, model, years,
                                                               max_base_drop=max_base_drop))

    return app


def _answer(prediction) -> dict:
    out = asdict(prediction)
    out.pop("image")
    return out
