"""Admission and batching in front of the model: ``Lane`` bounds the requests waiting for a worker and
their wait, ``MicroBatcher`` gathers concurrent photos into one forward pass."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

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
