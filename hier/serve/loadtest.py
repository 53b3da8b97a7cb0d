"""A bounded load test of a running service: N requests from C concurrent clients, then it stops.

    from hier.serve.loadtest import load_test
    load_test("http://127.0.0.1:8000", photos, requests=2000, clients=8)

Each client is a thread with its own keep-alive connection posting photos (round robin) to
``/predict``; latencies are per request, wall clock to last answer gives the throughput.
"""
from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import httpx
import numpy as np


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
