"""Load test and upload fuzz of `hier serve` on loopback: the real CLI in a subprocess, then N requests
from C concurrent clients (photos of ../shared/data/stanford-cars-dev by default), then malformed and
randomly damaged uploads, each of which must be answered 4xx with the service healthy afterwards.

    python scripts/bench_serve.py ARTIFACT --requests 2000 --clients 8
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hier.data import image_files
from hier.serve.loadtest import load_test

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev" / "train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fuzz(url: str, jpeg: bytes, n: int, seed: int) -> dict:
    """n uploads of random bytes, cut JPEGs and JPEGs with overwritten bytes: counts by status."""
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            kind = i % 3
            if kind == 0:
                body = rng.randbytes(rng.randint(0, 4096))
            elif kind == 1:
                body = jpeg[:rng.randint(0, len(jpeg))]
            else:
                body = bytearray(jpeg)
                for _ in range(rng.randint(1, 20)):
                    body[rng.randrange(len(body))] = rng.randrange(256)
                body = bytes(body)
            code = http.post("/predict", files={"file": ("x.jpg", body, "image/jpeg")}).status_code
            statuses[code] = statuses.get(code, 0) + 1
        healthy = http.get("/health").json()["status"] == "ok"
    return {"uploads": n, "by_status": statuses, "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "healthy_after": healthy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--photos", type=Path, default=SHARED)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--fuzz", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    photos = image_files([args.photos]).paths
    random.Random(args.seed).shuffle(photos)
    photos = photos[:200]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "hier", "serve", str(args.artifact), "--port", str(port)],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        load = load_test(url, photos, args.requests, args.clients)
        health = httpx.get(url + "/health").json()
        load["mean_batch"] = health["batched_photos"] / max(health["batches"], 1)
        fuzzed = fuzz(url, photos[0].read_bytes(), args.fuzz, args.seed)
    finally:
        server.terminate()
        server.wait(30)
    command = " ".join(["python scripts/bench_serve.py", str(args.artifact), "--requests", str(args.requests),
                        "--clients", str(args.clients), "--fuzz", str(args.fuzz)])
    print(json.dumps({"command": command, "load": load, "fuzz": fuzzed}, indent=1, default=float))


if __name__ == "__main__":
    main()
