"""Bounded load tests of a running service: they stop by themselves.

    from hier.serve.loadtest import load_test, mixed_load, overload
    load_test("http://127.0.0.1:8000", photos, requests=2000, clients=8)      # N /predict, C clients
    mixed_load(url, photos, clients=4, seconds=30)      # /predict + /similar + thumbnails, closed loop
    overload(url, photos, rate=80, seconds=30)          # open loop: requests at a fixed rate

Each closed-loop client is a thread with its own keep-alive connection; latencies are per request,
wall clock to the last answer gives the throughput. ``overload`` sends at the given rate whatever the
answers (asyncio), as real traffic does, so a service slower than the rate must refuse (503) rather
than let requests pile up.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np


def summary(latencies_s: list[float]) -> dict:
    """count, p50/p95/max in ms (zeros for no requests)."""
    ms = 1000 * np.asarray(latencies_s if latencies_s else [0.0])
    return {"n": len(latencies_s), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}


def load_test(url: str, photos: list[Path], requests: int = 2000, clients: int = 8, endpoint: str = "/predict",
              timeout_s: float = 60.0) -> dict:
    """p50/p95/max latency (ms), throughput (requests/s) and the errors (non-200 answers or failed
    connections) of ``requests`` posts of ``photos`` to ``url + endpoint`` from ``clients`` threads."""
    bodies = [(Path(p).name, Path(p).read_bytes()) for p in photos]
    tickets = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            while (i := next(tickets)) < requests:
                name, body = bodies[i % len(bodies)]
                t = time.perf_counter()
                try:
                    r = http.post(endpoint, files={"file": (name, body, "application/octet-stream")})
                    failure = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    failure = f"{type(e).__name__}: {e}"
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if failure:
                        errors.append(failure)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = 1000 * np.array(latencies)
    return {"requests": len(latencies), "clients": clients, "errors": len(errors), "first_error": errors[0] if errors else None,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "max_ms": float(ms.max()),
            "throughput_rps": len(latencies) / wall, "wall_s": wall}


def mixed_load(url: str, photos: list[Path], clients: int = 4, seconds: float = 30.0,
               stop: threading.Event | None = None, similar_every: int = 4, thumbnails: int = 2,
               timeout_s: float = 60.0) -> dict:
    """Closed-loop mixed traffic for ``seconds`` (or until ``stop`` is set): each client posts a photo
    to /predict, every ``similar_every``-th time to /similar (k=10) too (0: never), then fetches
    ``thumbnails`` of the listings' hier_photo_url. Per endpoint: latency summary of every answer, of the 200
    answers (``ok``) and answers by status (``failed``: no answer); /predict's throughput in 200 answers."""
    bodies = [(Path(p).name, Path(p).read_bytes()) for p in photos]
    stop = stop or threading.Event()
    lat: dict[str, list[tuple[float, object]]] = {"predict": [], "similar": [], "thumbnail": []}
    status: dict[str, Counter] = {k: Counter() for k in lat}
    lock = threading.Lock()

    def timed(kind, call):
        t = time.perf_counter()
        try:
            r = call()
            code = r.status_code
        except httpx.HTTPError:
            r, code = None, "failed"
        with lock:
            lat[kind].append((time.perf_counter() - t, code))
            status[kind][code] += 1
        return r

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            for i in itertools.count(c):
                if stop.is_set():
                    return
                file = {"file": (*bodies[i % len(bodies)], "image/jpeg")}
                timed("predict", lambda f=file: http.post("/predict", files=f))
                if similar_every and i % similar_every == 0:
                    r = timed("similar", lambda f=file: http.post("/similar", params={"k": 10}, files=f))
                    rows = r.json().get("listings", []) if r is not None and r.status_code == 200 else []
                    for row in rows[:thumbnails]:
                        timed("thumbnail", lambda url=row["hier_photo_url"]: http.get(url))

    timer = threading.Timer(seconds, stop.set)
    timer.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    timer.cancel()
    wall = time.perf_counter() - start
    return {"clients": clients, "wall_s": round(wall, 1), "predict_rps": round(status["predict"][200] / wall, 2),
            **{k: {**summary([s for s, _ in lat[k]]), "ok": summary([s for s, c in lat[k] if c == 200]),
                   "by_status": {str(c): n for c, n in status[k].items()}} for k in lat}}


def overload(url: str, photos: list[Path], rate: float, seconds: float, timeout_s: float) -> dict:
    """Open-loop /predict at ``rate`` requests/s for ``seconds``, whatever the answers: by status,
    latency summary, ``hung`` (no answer within ``timeout_s``, or a failed connection), and the
    slowest answer of each status."""
    bodies = [(Path(p).name, Path(p).read_bytes()) for p in photos]
    n = int(rate * seconds)

    async def run() -> list[tuple[object, float]]:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
            start = time.perf_counter()

            async def one(i: int):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                name, body = bodies[i % len(bodies)]
                t = time.perf_counter()
                try:
                    code = (await http.post("/predict", files={"file": (name, body, "image/jpeg")})).status_code
                except httpx.HTTPError as e:
                    code = f"hung: {type(e).__name__}"
                return code, time.perf_counter() - t

            return await asyncio.gather(*(one(i) for i in range(n)))

    start = time.perf_counter()
    answers = asyncio.run(run())
    wall = time.perf_counter() - start
    by_status = Counter(code for code, _ in answers)
    slowest = {str(code): round(1000 * max(s for c, s in answers if c == code), 1) for code in by_status}
    return {"rate_rps": round(rate, 2), "seconds": seconds, "requests": n, "wall_s": round(wall, 1),
            "by_status": {str(k): v for k, v in by_status.items()},
            "hung": sum(v for k, v in by_status.items() if isinstance(k, str)),
            "other_than_200_503": sum(v for k, v in by_status.items() if k not in (200, 503)),
            "slowest_ms_by_status": slowest, **summary([s for _, s in answers])}
