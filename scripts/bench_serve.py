"""Production benchmark of `hier serve` on loopback: the real CLI in a subprocess over a copy of ARTIFACT
with a large listing gallery, then, in order:

1. capacity: /predict alone from C closed-loop clients (the sustainable rate);
2. mixed: /predict + /similar + thumbnails from C clients for S seconds (the baseline);
3. build: the same mixed load while a CLI `hier index build` rebuilds the gallery of the very artifact
   being served (the interesting case: same lock, same files); /predict's p95 against the baseline;
4. overload: open-loop /predict at 4x the sustainable rate for 30 s: every request must be answered
   200 or 503 within the service's timeout, none may hang;
5. fuzz: >= 1,000 random uploads, form fields, query values, listing ids and raw bodies over every
   endpoint: no 5xx, and the service healthy and without a traceback in its log afterwards;
6. slow clients: ``--slow-clients`` connections (half trickle their headers, half send 9 MB of a body and
   then trickle) held for ``--slow-seconds`` (reopened whenever the service lets one go) beside the mixed
   load: /predict's p95 against the baseline, and the spooled upload space the service still holds (its
   deleted temporary files) once the body deadline has passed.

The gallery: N listings (default 100,000) whose vectors are real embeddings of dev photos, perturbed,
and whose rows point at those photos over and over (some with ids that need percent-encoding), written
with hier's own ``Gallery`` class, so the service serves it as any gallery. The copy is deleted at the
end (``--keep`` keeps it). Prints sys.argv, the git commit and the load average before and after, as
every benchmark here does: numbers from a busy machine are not comparable.

    python scripts/bench_serve.py ARTIFACT              # the full run; the last line is a JSON report
    python scripts/bench_serve.py ARTIFACT --seconds 10 --overload-seconds 10 --build-photos 20   # smoke

``--build-nice 19`` runs the build at the lowest priority: on 2 cores the build and the service share the
CPU, and that run separates what CPU sharing costs from what waiting on the artifact would.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pandas as pd
from benchlib import machine

from hier import Recognizer
from hier.artifact.files import CHECKPOINT, GALLERY
from hier.data import image_files
from hier.fileio import LOCK
from hier.gallery.gallery import Gallery
from hier.gallery.listings import BRAND, CLASS, MODEL
from hier.metrics import answer
from hier.serve.loadtest import mixed_load, overload

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev" / "train"
TOKEN = "bench-token"
BODY_TIMEOUT_S = 10.0          # the service's --body-timeout here: slow bodies are let go after it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_artifact(src: Path, work: Path) -> Path:
    """The artifact without its training checkpoint and gallery: the bench writes its own gallery."""
    dst = work / "artifact"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(CHECKPOINT, GALLERY, LOCK))
    return dst


def big_gallery(art: Path, photos: list[Path], n: int, seed: int) -> dict:
    """n listings from perturbed real embeddings of ``photos``, saved as the artifact's gallery."""
    t = time.perf_counter()
    rec = Recognizer(art)
    out = rec.embed(photos)
    tax = rec.taxonomy
    brand, model, fine = answer(out["probs"], tax)
    rng = np.random.default_rng(seed)
    base = np.arange(n) % len(photos)
    vectors = out["embedding"][base] + rng.normal(0, 0.05, (n, out["embedding"].shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"lot {i}/a#b?x=1" if i % 997 == 0 else f"L{i:06d}" for i in range(n)]
    listings = pd.DataFrame({"listing_id": ids, "image": [str(photos[b]) for b in base],
                             "price": rng.integers(1000, 90000, n), CLASS: [tax.classes[fine[b]] for b in base],
                             BRAND: [tax.brands[brand[b]] for b in base], MODEL: [tax.models[model[b]] for b in base]})
    Gallery.build(vectors, listings, "flat").save(art)
    return {"listings": n, "from_photos": len(photos), "dim": int(vectors.shape[1]),
            "seconds": round(time.perf_counter() - t, 1)}


def start_server(art: Path, port: int, log: Path, timeout_s: float, max_queue: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "hier", "serve", str(art), "--port", str(port), "--timeout", str(timeout_s),
         "--max-queue", str(max_queue), "--body-timeout", str(BODY_TIMEOUT_S)],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HIER_ADMIN_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}); see {log}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not get ready; see {log}")


def build_during_load(url: str, art: Path, photos: list[Path], build_photos: list[Path], work: Path,
                      clients: int, min_seconds: float, nice: int = 0) -> dict:
    """Mixed load while `hier index build ART LISTINGS` runs (at least ``min_seconds`` of load); the
    build at ``nice`` priority (0: as a user would run it)."""
    csv = work / "build_listings.csv"
    pd.DataFrame({"listing_id": [f"B{i:05d}" for i in range(len(build_photos))],
                  "image": [str(p) for p in build_photos]}).to_csv(csv, index=False)
    stop = threading.Event()
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(mixed_load(url, photos, clients, 1e9, stop)))
    load.start()
    time.sleep(1.0)
    t = time.perf_counter()
    build = subprocess.run(["nice", "-n", str(nice), sys.executable, "-m", "hier", "index", "build", str(art), str(csv)],
                           capture_output=True, text=True, check=False)
    build_s = time.perf_counter() - t
    time.sleep(max(0.0, min_seconds - build_s))
    stop.set()
    load.join()
    gallery = httpx.get(url + "/health/ready", timeout=10).json()
    return {"build": {"exit": build.returncode, "seconds": round(build_s, 1), "photos": len(build_photos), "nice": nice,
                      "stderr_tail": build.stderr.strip().splitlines()[-1:] if build.returncode else []},
            "load": result, "gallery_after": gallery.get("gallery")}


# --- fuzz -----------------------------------------------------------------------------------------
def _junk_text(rng: random.Random) -> str:
    pools = [string.printable, "NA None null NaN N/A \r\n\t\x00", "신형모델_2025 äöü 🚗 ", "../%2e%2e/#?&="]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40)))


def _junk_number(rng: random.Random) -> str:
    return rng.choice(["nan", "inf", "-inf", "-1", "0", "1e999", "99999999999999999999", "0x10", "", " 5 ",
                       "1.5", "abc", str(rng.randint(-10 ** 6, 10 ** 6)), str(rng.uniform(-200, 200))])


def _junk_photo(rng: random.Random, jpeg: bytes) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 4096))
    if kind == 1:
        return jpeg[:rng.randint(0, len(jpeg))]
    if kind == 2:
        body = bytearray(jpeg)
        for _ in range(rng.randint(1, 20)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return bytes(body)
    return jpeg


def raw_request(port: int, head: bytes, body_chunks, read_s: float = 10.0) -> int | None:
    """Send a hand-made HTTP/1.1 request (lying or missing lengths, chunked bodies); the status or None."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        try:
            s.sendall(head)
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:                       # the server closed early: its answer may be waiting
            pass
        try:
            line = s.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return None
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def fuzz(url: str, port: int, jpeg: bytes, n: int, seed: int) -> dict:
    """n requests over every endpoint with random uploads, fields, query values and paths, plus raw
    bodies without or with lying lengths: counts by endpoint and status."""
    rng = random.Random(seed)
    statuses: dict[str, dict] = {}
    server_errors: list[str] = []

    def note(what: str, code) -> None:
        statuses.setdefault(what, {})
        statuses[what][str(code)] = statuses[what].get(str(code), 0) + 1
        if isinstance(code, int) and code >= 500:
            server_errors.append(f"{what}: {code}")

    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(n):
            kind = i % 10
            photo = ("x.jpg", _junk_photo(rng, jpeg), rng.choice(["image/jpeg", "text/plain", ""]))
            if kind in (0, 1):
                params = {"topk": _junk_number(rng)} if rng.random() < 0.5 else {}
                note("/predict", http.post("/predict", params=params, files={"file": photo}).status_code)
            elif kind in (2, 3):
                params = {"k": _junk_number(rng), "same_brand": rng.choice(["true", "0", "maybe", ""])}
                note("/similar", http.post("/similar", params=params, files={"file": photo}).status_code)
            elif kind in (4, 5):
                token = rng.choice([TOKEN, TOKEN, "wrong", "", None])
                # damaged shots, and now and then (2%) real ones: a real enrollment takes the model a while
                shot = (lambda: jpeg) if rng.random() < 0.02 else (
                    lambda: rng.choice([rng.randbytes(rng.randint(0, 2048)), jpeg[:rng.randint(0, len(jpeg) // 2)]]))
                files = [("files", ("s.jpg", shot(), "image/jpeg")) for _ in range(rng.choice([0, 1, 2, 3, 70]))]
                data = {"class": _junk_text(rng), "brand": _junk_text(rng), "model": _junk_text(rng),
                        "years": rng.choice([_junk_text(rng), "2025", "2025-2026", "99999-99999"]),
                        "max_base_drop": _junk_number(rng)}
                data = {k: v for k, v in data.items() if rng.random() < 0.8}
                headers = {"X-Admin-Token": token} if token is not None else {}
                note("/enroll", http.post("/enroll", files=files or None, data=data, headers=headers).status_code)
            elif kind in (6, 7):
                listing = rng.choice([_junk_text(rng), "L000001", "lot 0/a#b?x=1", "../../etc/passwd", "%00", "a/b/c"])
                safe = rng.choice(["", "/", "/%"])          # encoded whole, by path segment, or half-encoded
                note("/listings/{id}/photo", http.get(f"/listings/{quote(listing, safe=safe)}/photo").status_code)
            elif kind == 8:
                path = rng.choice(["/health", "/health/live", "/health/ready", "/metrics", "/", "/docs",
                                   "/openapi.json", "/nothing", "/predict", "/enroll"])
                note(f"GET {path}", http.get(path).status_code)
            else:
                body = _junk_photo(rng, jpeg)
                head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n")
                form = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + body
                        + b"\r\n--B--\r\n")
                choice = rng.randrange(3)
                if choice == 0:               # chunked, way over the limit
                    chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in [form[:200]] + [b"\xff" * 65536] * 200] + [b"0\r\n\r\n"]
                    code = raw_request(port, head + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
                elif choice == 1:             # declares far more than it sends
                    code = raw_request(port, head + b"Content-Length: 99999999999\r\n\r\n", [form])
                else:                         # declares less than it sends
                    code = raw_request(port, head + b"Content-Length: %d\r\n\r\n" % (len(form) // 2), [form])
                note("raw /predict", code)
        health = http.get("/health/ready").json()
    return {"requests": n, "by_endpoint": statuses, "server_errors": len(server_errors),
            "first_server_errors": server_errors[:5], "healthy_after": health.get("status") == "ok"}


def slow_clients(url: str, port: int, photos: list, clients: int, seconds: float, server_pid: int,
                 deadline_s: float) -> dict:
    """Phase 6: ``clients`` slow connections for ``seconds`` beside the mixed load (see the module)."""
    stop, quiet = threading.Event(), threading.Event()
    let_go = [0]
    big = b"x" * (9 * 2 ** 20)

    def slow(i: int) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    if i % 2:                       # slow headers
                        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
                    else:                           # a big body, then a trickle
                        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                  b"boundary=b\r\nContent-Length: 10000000\r\n\r\n--b\r\nContent-Disposition: "
                                  b'form-data; name="file"; filename="a.jpg"\r\n\r\n' + big)
                    while not stop.is_set():
                        if not quiet.is_set():          # quiet: connections held open, nothing sent
                            s.sendall(b"x")
                        s.settimeout(1.0)
                        try:
                            if s.recv(4096) == b"":
                                break
                        except socket.timeout:
                            continue
                    let_go[0] += 1
                while quiet.is_set() and not stop.is_set():    # let go: no new connection once quiet
                    time.sleep(0.2)
            except OSError:
                let_go[0] += 1
                time.sleep(0.2)
    threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    load = mixed_load(url, photos, 4, seconds)
    quiet.set()                                     # the slow clients go silent, their connections open
    time.sleep(deadline_s + 2)                      # past the body deadline: nothing may stay pinned
    pinned = 0
    for fd in Path(f"/proc/{server_pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.endswith("(deleted)"):
                pinned += os.stat(fd).st_size
        except OSError:
            pass
    stop.set()
    for t in threads:
        t.join(10)
    return {"clients": clients, "seconds": seconds, "let_go": let_go[0], "load": load,
            "pinned_deleted_bytes_after_deadline": pinned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--photos", type=Path, default=SHARED)
    ap.add_argument("--listings", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the capacity and mixed phases")
    ap.add_argument("--overload-seconds", type=float, default=30.0)
    ap.add_argument("--overload-factor", type=float, default=4.0)
    ap.add_argument("--build-photos", type=int, default=300, help="listings the CLI index build embeds")
    ap.add_argument("--build-nice", type=int, default=0, help="run the index build at this nice level")
    ap.add_argument("--fuzz", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=10.0, help="the service's --timeout")
    ap.add_argument("--max-queue", type=int, default=32, help="the service's --max-queue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the artifact copy and the server log")
    ap.add_argument("--slow-clients", type=int, default=50)
    ap.add_argument("--slow-seconds", type=float, default=60.0)
    ap.add_argument("--skip", default="", help="phases to leave out, comma-separated: build,overload,fuzz")
    args = ap.parse_args()
    report: dict = {"machine_before": machine()}
    print(json.dumps(report["machine_before"]), flush=True)
    photos = image_files([args.photos]).paths
    random.Random(args.seed).shuffle(photos)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        art = copy_artifact(args.artifact, work)
        report["gallery"] = big_gallery(art, photos[:200], args.listings, args.seed)
        print(json.dumps({"gallery": report["gallery"]}), flush=True)
        port, log = free_port(), work / "server.log"
        url = f"http://127.0.0.1:{port}"
        server = start_server(art, port, log, args.timeout, args.max_queue)
        skip = set(filter(None, args.skip.split(",")))
        try:
            load_photos = photos[:200]
            capacity = mixed_load(url, load_photos, args.clients, args.seconds, similar_every=0)
            report["capacity"] = {"predict_rps": capacity["predict_rps"], "predict": capacity["predict"]}
            print(json.dumps({"capacity": report["capacity"]}), flush=True)
            report["mixed"] = mixed_load(url, load_photos, args.clients, args.seconds)
            print(json.dumps({"mixed": report["mixed"]}), flush=True)
            base = report["mixed"]["predict"]
            if "build" not in skip:
                report["during_build"] = build_during_load(url, art, load_photos,
                                                           photos[200:200 + args.build_photos], work, args.clients,
                                                           args.seconds, args.build_nice)
                during = report["during_build"]["load"]["predict"]
                report["during_build"]["predict_p95_ratio"] = round(during["p95_ms"] / max(base["p95_ms"], 1e-9), 2)
                report["during_build"]["predict_503_share"] = {
                    "before": round(base["by_status"].get("503", 0) / max(base["n"], 1), 3),
                    "during": round(during["by_status"].get("503", 0) / max(during["n"], 1), 3)}
                print(json.dumps({"during_build": report["during_build"]}), flush=True)
            if "overload" not in skip:
                rate = max(1.0, args.overload_factor * capacity["predict_rps"])
                report["overload"] = overload(url, load_photos, rate, args.overload_seconds, args.timeout + 5)
                report["overload"]["service_timeout_s"] = args.timeout
                print(json.dumps({"overload": report["overload"]}), flush=True)
            if "fuzz" not in skip:
                report["fuzz"] = fuzz(url, port, photos[0].read_bytes(), args.fuzz, args.seed)
                print(json.dumps({"fuzz": report["fuzz"]}), flush=True)
            slow = report["slow_clients"] = slow_clients(url, port, load_photos, args.slow_clients,
                                                         args.slow_seconds, server.pid, BODY_TIMEOUT_S)
            slow["predict_p95_ratio"] = round(slow["load"]["predict"]["p95_ms"] / max(base["p95_ms"], 1e-9), 2)
            print(json.dumps({"slow_clients": slow}), flush=True)
            report["metrics_sample"] = [line for line in httpx.get(url + "/metrics").text.splitlines()
                                        if line.startswith(("hier_artifact", "hier_refused", "hier_batch_size_sum",
                                                            "hier_batch_size_count", "hier_batcher"))]
        finally:
            t = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = "killed after 60 s"
            report["shutdown"] = {"exit": code, "seconds": round(time.perf_counter() - t, 2)}
        text = log.read_text(errors="replace")
        report["server_log"] = {"lines": text.count("\n"), "tracebacks": text.count("Traceback"),
                                "access_lines": sum(line.startswith("{") for line in text.splitlines())}
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["machine_after"] = machine()
    goals = {"no_traceback_in_log": report["server_log"]["tracebacks"] == 0,
             "slow_clients_p95_within_2x": report["slow_clients"]["predict_p95_ratio"] <= 2.0,
             "slow_clients_nothing_pinned": report["slow_clients"]["pinned_deleted_bytes_after_deadline"] == 0}
    if "overload" in report:
        goals.update(overload_all_200_or_503=report["overload"]["other_than_200_503"] == 0,
                     overload_none_slower_than_timeout=report["overload"]["max_ms"] <= 1000 * (args.timeout + 1))
    if "fuzz" in report:
        goals["fuzz_no_5xx"] = report["fuzz"]["server_errors"] == 0 and report["fuzz"]["healthy_after"]
    if report.get("during_build"):
        goals.update(build_p95_within_2x=report["during_build"]["predict_p95_ratio"] <= 2.0,
                     build_succeeded=report["during_build"]["build"]["exit"] == 0)
    report["goals"] = goals
    print(json.dumps(report, indent=1, default=str, ensure_ascii=False))


if __name__ == "__main__":
    main()
