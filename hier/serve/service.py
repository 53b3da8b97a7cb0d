"""What one running service holds: the recognizer, its one model thread and the thumbnail threads, the
lanes that admit requests to them, the micro-batcher and the metrics. Routes reach it through
``request.app.state.service`` (``service_of``)."""
from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fastapi import HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from hier.data import NOT_IMAGE, TOO_LARGE, UNREADABLE, UploadRefused, decode_upload
from hier.enrollment.state import Shot
from hier.gallery.store import exists as gallery_exists
from hier.recognizer import Recognizer
from hier.serve.batching import Lane, MicroBatcher
from hier.serve.metrics import Metrics

REFUSED_STATUS = {NOT_IMAGE: 415, UNREADABLE: 400, TOO_LARGE: 413}


@dataclass
class Service:
    """The state of one service over ``rec`` (``create_app`` makes it).

    Args:
        rec: the recognizer answering every request.
        max_upload_mb: the limit of each uploaded file.
        max_batch, wait_ms: the micro-batcher's batch size and wait.
        max_queue, timeout_s: requests waiting for a worker, and how long each may wait.
        max_enroll_files: photos one ``/enroll`` may upload.
    """

    rec: Recognizer
    max_upload_mb: float = 10.0
    max_batch: int = 16
    wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_enroll_files: int = 64
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.limit = int(self.max_upload_mb * 2 ** 20)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hier-model")
        self.thumb_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hier-thumb")
        self.model_lane = Lane("model", self.max_queue, self.timeout_s, self.metrics.queue_depth.labels("model"))
        self.thumb_lane = Lane("thumbnails", self.max_queue, self.timeout_s,
                               self.metrics.queue_depth.labels("thumbnails"))
        self.batcher = MicroBatcher(self.predict_batch, self.model_thread, self.max_batch, self.wait_ms,
                                    on_restart=self.metrics.restarts.inc)
        self.fingerprinted: list = [None, None]     # (snapshot, its fingerprint): computed once per version

    def predict_batch(self, items: list[tuple[np.ndarray, int]]) -> list[dict]:
        """In the model thread: one forward pass for the photos of concurrent ``/predict`` requests."""
        self.metrics.batch_size.observe(len(items))
        results = self.rec.predict([image for image, _ in items], topk=max(k for _, k in items))
        return [{**_answer(r), "topk": r.topk[:k]} for r, (_, k) in zip(results, items)]

    async def in_model_thread(self, fn, *args):
        """Every use of the model runs in its one thread: no two requests race on it."""
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    def has_gallery(self) -> bool:
        return gallery_exists(self.rec.path)

    async def photo(self, upload: UploadFile) -> np.ndarray:
        """The upload decoded (in a worker thread, never on the event loop), or a 4xx."""
        return (await self._decoded(upload))[0]

    async def shot(self, upload: UploadFile) -> Shot:
        """An enrollment shot: the upload decoded and the MD5 of its bytes (how the CLI counts the same
        file), both computed in a worker thread, or a 4xx."""
        return Shot(*await self._decoded(upload, digest=True))

    async def _decoded(self, upload: UploadFile, digest: bool = False) -> tuple[np.ndarray, str | None]:
        data = await upload.read(self.limit + 1)
        if len(data) > self.limit:
            raise HTTPException(413, f"{upload.filename or 'upload'} is over the {self.max_upload_mb:g} MB limit")
        loaded = self.rec.loaded            # uploads decode at reduced scale down to the model's input
        try:
            image = await run_in_threadpool(decode_upload, data, upload.filename or "upload",
                                            loaded.net.cfg.img_size if loaded else None)
        except UploadRefused as e:
            raise HTTPException(REFUSED_STATUS[e.reason], str(e)) from None
        return image, (await run_in_threadpool(lambda: hashlib.md5(data).hexdigest()) if digest else None)

    async def start(self) -> None:
        await self.in_model_thread(self.rec.reload)             # load once, up front

    async def stop(self) -> None:
        """Answer what was accepted, then stop."""
        await asyncio.gather(self.model_lane.drain(self.timeout_s + 1), self.thumb_lane.drain(self.timeout_s + 1))
        await self.batcher.stop()
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.thumb_threads.shutdown(wait=False, cancel_futures=True)


def service_of(request: Request) -> Service:
    """The running service (a FastAPI dependency)."""
    return request.app.state.service


def _answer(prediction) -> dict:
    out = prediction.to_dict()
    out.pop("image")
    return out
