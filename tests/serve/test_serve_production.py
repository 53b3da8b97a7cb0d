"""`hier serve` as a hostile client and an operator see it: bodies that never end, requests without a
token, a full queue, a slow or dead model worker, a writer holding the artifact, huge and damaged listing
photos, odd listing ids, metrics, access logs, shutdown and restart. Every server here runs with a
deadline (client timeouts, a bounded join), so a hang fails the test instead of stalling the run."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest
import uvicorn
from conftest import run_cli, served
from fastapi.testclient import TestClient
from PIL import Image

from hier import HierError, Recognizer, artifact, fileio
from hier.cli.serve import check_listen
from hier.serve import ADMIN_TOKEN_ENV, create_app
from hier.serve.server import server_config

CLS = "Cinder_Rook_2019_2023"
DEADLINE = 20.0                          # seconds any one request may take before the test fails


def _photos(demo_data, cls=CLS, n=4) -> list[Path]:
    return sorted((demo_data.train_dir / cls).glob("*.jpg"))[:n]


@contextmanager
def live(app):
    """The app on a loopback port (uvicorn in a thread) and an httpx client with a deadline; the
    server is stopped on exit, forced if it does not stop in time."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app))               # as `hier serve` runs it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    start = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - start < 120, "server failed to start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(base_url=url, timeout=DEADLINE) as http:
            yield http, server
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        sock.close()


class Gate:
    """Makes a recognizer's predict wait until opened: a model worker that is busy for as long as a
    test needs. ``entered`` is set once the worker is inside."""

    def __init__(self, rec: Recognizer):
        self.open, self.entered, real = threading.Event(), threading.Event(), rec.predict

        def slow_predict(*args, **kwargs):
            self.entered.set()
            assert self.open.wait(60), "the gate was never opened"
            return real(*args, **kwargs)

        rec.predict = slow_predict


@contextmanager
def held_request(art, demo_data, **app_kw):
    """A live service with one /predict request inside the model worker, held at a ``Gate``: yields
    (http, server, app, gate, pending photo, the request's result function)."""
    rec = Recognizer(art)
    gate = Gate(rec)
    photo = _photos(demo_data)[0]
    app = create_app(art, recognizer=rec, **app_kw)
    with live(app) as (http, server):
        pending = _in_thread(lambda: _post_photo(http, photo))
        assert gate.entered.wait(DEADLINE)
        yield http, server, app, gate, photo, pending


def _post_photo(http, path: Path, url="/predict", **kw):
    return http.post(url, files={"file": (path.name, path.read_bytes(), "image/jpeg")}, **kw)


def _in_thread(fn):
    """Run fn() in a thread; returns a function that joins it and returns its result (or raises)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:          # noqa: BLE001 - re-raised in the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def result():
        t.join(DEADLINE)
        assert not t.is_alive(), "request hung"
        if "error" in out:
            raise out["error"]
        return out["value"]
    return result


# --- bodies: read no more than the limit, and nothing before the token ------------------------------
def _asgi_post(app, path: str, chunks, headers: dict[str, str]) -> tuple[int, int, dict]:
    """POST ``chunks`` to the app straight through ASGI, as a server streams a body: (bytes the app
    read, status, JSON answer). TestClient would read the whole body before the app sees it. A refusal
    sent before the body was read must close the connection (else the server reads the rest)."""
    read = 0
    chunks = iter(chunks)
    out = []

    async def receive():
        nonlocal read
        try:
            chunk = next(chunks)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        out.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in out if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    if start["status"] >= 400:
        assert (b"connection", b"close") in start["headers"], start
    return read, start["status"], json.loads(body)


def _endless_form(field: str, chunk: int = 64 * 1024, total: int = 64 * 2 ** 20):
    """A multipart body of one file part that goes on for ``total`` bytes, in ``chunk``-byte pieces."""
    yield (f'--B\r\nContent-Disposition: form-data; name="{field}"; filename="a.jpg"\r\n'
           'Content-Type: image/jpeg\r\n\r\n').encode()
    for _ in range(total // chunk):
        yield b"\xff" * chunk


FORM = {"content-type": "multipart/form-data; boundary=B"}


def test_a_chunked_body_is_read_no_further_than_the_limit(art):
    """No Content-Length (chunked): the body stops being read once it passes the limit, 413. Before,
    only a declared length was checked and a chunked body was read to its end (here 64 MB)."""
    app = create_app(art, max_upload_mb=1, max_enroll_files=2)
    limit = 2 ** 20 + 256 * 2 ** 10                     # one photo plus the form's framing
    read, status, answer = _asgi_post(app, "/predict", _endless_form("file"), {**FORM, "transfer-encoding": "chunked"})
    assert status == 413 and "limit" in answer["detail"]
    assert limit < read <= limit + 64 * 1024 + 200, read
    # a declared length over the limit: not a byte is read
    read, status, _ = _asgi_post(app, "/predict", _endless_form("file"), {**FORM, "content-length": str(10 ** 9)})
    assert (read, status) == (0, 413)
    # /enroll takes max_enroll_files photos, and no more bytes than that
    os.environ[ADMIN_TOKEN_ENV] = "s3cret"
    try:
        read, status, _ = _asgi_post(app, "/enroll", _endless_form("files"),
                                     {**FORM, "transfer-encoding": "chunked", "x-admin-token": "s3cret"})
    finally:
        del os.environ[ADMIN_TOKEN_ENV]
    assert status == 413 and 2 * 2 ** 20 < read <= 2 * 2 ** 20 + 256 * 2 ** 10 + 64 * 1024 + 200, read


def test_enroll_checks_the_token_before_reading_the_body(art, monkeypatch):
    app = create_app(art)
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    read, status, answer = _asgi_post(app, "/enroll", _endless_form("files"), {**FORM, "transfer-encoding": "chunked"})
    assert (read, status) == (0, 403) and ADMIN_TOKEN_ENV in answer["detail"]
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    for headers in ({}, {"x-admin-token": "wrong"}, {"x-admin-token": ""}):
        read, status, _ = _asgi_post(app, "/enroll", _endless_form("files"),
                                     {**FORM, "transfer-encoding": "chunked", **headers})
        assert (read, status) == (0, 401), headers


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and f.name != fileio.LOCK}


def test_enroll_refuses_too_many_files_and_bad_numbers_leaving_the_artifact_as_it_was(art, demo_data, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    before = _files(art)
    photo = _photos(demo_data, "Borealis_Lynx_2019_2022")[0].read_bytes()
    form = {"class": "Newcar_2025", "brand": "Borealis", "years": "2025"}
    with TestClient(create_app(art, max_enroll_files=3)) as client:
        def enroll(n=3, **fields):
            return client.post("/enroll", files=[("files", (f"{i}.jpg", photo, "image/jpeg")) for i in range(n)],
                               data={**form, **fields}, headers={"X-Admin-Token": "s3cret"})
        r = enroll(4)
        assert r.status_code == 400 and "Too many files" in r.json()["detail"]
        for value in ("nan", "inf", "-inf", "-1", "100.5", "1e999"):
            r = enroll(max_base_drop=value)
            assert r.status_code in (400, 422) and "max" in json.dumps(r.json()).lower(), (value, r.text)
        r = client.post("/enroll", files=[("files", ("a.jpg", photo, "image/jpeg"))],
                        data={**form, **{f"extra{i}": "x" for i in range(20)}}, headers={"X-Admin-Token": "s3cret"})
        assert r.status_code == 400 and "Too many fields" in r.json()["detail"]
    assert _files(art) == before


@pytest.mark.parametrize("flags, words", [
    (["--max-upload-mb", "-1"], "--max-upload-mb"), (["--max-upload-mb", "nan"], "--max-upload-mb"),
    (["--max-batch", "0"], "--max-batch"), (["--port", "70000"], "--port"), (["--max-queue", "0"], "--max-queue"),
    (["--timeout", "inf"], "--timeout"), (["--max-enroll-files", "0"], "--max-enroll-files")])
def test_serve_refuses_bad_numbers_in_one_line_before_reading_the_artifact(art, tmp_path, capsys, flags, words,
                                                                          monkeypatch):
    """The flag is refused in one line before the artifact is read (its loader is never called)."""
    from hier import artifact as store

    def unread(*a, **k):
        raise AssertionError("the artifact was read")
    monkeypatch.setattr(store, "snapshot", unread)
    code, _, err = run_cli("serve", art, *flags, capsys=capsys)
    assert code == 2 and err.startswith(f"error: {words} must be") and len(err.strip().splitlines()) == 1, err
    with pytest.raises(HierError, match="--max-batch"):
        create_app(tmp_path / "nothing", max_batch=0)


def test_serve_refuses_a_host_that_is_no_interface(art, capsys):
    for host in ("no such host!", "999.1.1.1", "256.256.256.256"):
        code, _, err = run_cli("serve", art, "--host", host, capsys=capsys)
        assert code == 2 and err.startswith(f"error: cannot listen on {host}:") and len(err.strip().splitlines()) == 1


def test_the_port_probe_reuses_a_port_whose_server_just_stopped():
    """A stopped server leaves its closed connections in TIME_WAIT; uvicorn listens with SO_REUSEADDR
    and so must the probe, or a restart fails for ~60 s."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()                     # the server closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
    time.sleep(0.1)
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the probe did before
    check_listen("127.0.0.1", port)      # no error
    with socket.socket() as taken:       # a port another server listens on is still refused
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(HierError, match="cannot listen on"):
            check_listen("127.0.0.1", taken.getsockname()[1])


# --- a busy, slow or dead model worker -------------------------------------------------------------
def test_health_answers_while_the_model_is_busy(art, demo_data):
    with held_request(art, demo_data) as (http, _, _, gate, _, pending):
        for url in ("/health/live", "/health/ready", "/health"):
            t = time.perf_counter()
            r = http.get(url, timeout=3)
            assert r.status_code == 200 and r.json()["status"] == "ok" and time.perf_counter() - t < 2, url
        assert http.get("/health").json()["queue"] == 1
        gate.open.set()
        assert pending().status_code == 200


def test_a_full_queue_answers_503_with_retry_after_at_once(art, demo_data):
    with held_request(art, demo_data, max_batch=1, max_queue=2) as (http, _, _, gate, photo, first):
        second = _in_thread(lambda: _post_photo(http, photo))
        while http.get("/health").json()["queue"] < 2:
            time.sleep(0.02)
        t = time.perf_counter()
        r = _post_photo(http, photo, timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "waiting" in r.json()["detail"]
        assert time.perf_counter() - t < 2
        r = _post_photo(http, photo, url="/similar", timeout=5)      # the same queue bounds /similar
        assert r.status_code in (503, 409)
        gate.open.set()
        assert first().status_code == second().status_code == 200
        assert _post_photo(http, photo).status_code == 200
        assert 'hier_refused_total{reason="queue_full"}' in http.get("/metrics").text


def test_a_request_not_answered_in_time_gets_503(art, demo_data):
    rec = Recognizer(art)
    photo = _photos(demo_data)[0]
    rec.predict([photo])                 # the backend built now: its first use may take longer than 0.5 s
    gate = Gate(rec)
    with live(create_app(art, recognizer=rec, timeout_s=0.5)) as (http, _):
        t = time.perf_counter()
        r = _post_photo(http, photo)
        assert r.status_code == 503 and "within 0.5 s" in r.json()["detail"] and r.headers["retry-after"]
        assert time.perf_counter() - t < 5
        gate.open.set()
        deadline = time.perf_counter() + DEADLINE
        while http.get("/health").json()["batches"] < 1 and time.perf_counter() < deadline:
            time.sleep(0.02)             # the abandoned request leaves the worker before the next one
        assert _post_photo(http, photo).status_code == 200


def test_a_killed_batcher_is_restarted_and_its_requests_fail_fast(art, demo_data):
    with held_request(art, demo_data) as (http, _, app, gate, photo, pending):
        loop = app.state.batcher.task.get_loop()
        t = time.perf_counter()
        loop.call_soon_threadsafe(app.state.batcher.task.cancel)      # the batcher dies mid-batch
        r = pending()
        assert r.status_code == 503 and r.headers["retry-after"] and time.perf_counter() - t < 5
        gate.open.set()
        assert _post_photo(http, photo).status_code == 200            # restarted
        health = http.get("/health/ready").json()
        assert health["status"] == "ok" and health["batcher_restarts"] == 1
        assert "hier_batcher_restarts_total 1.0" in http.get("/metrics").text


def test_shutdown_drains_the_accepted_requests(art, demo_data):
    with held_request(art, demo_data) as (_, server, _, gate, _, pending):
        server.should_exit = True                                      # a stop while a request is in flight
        time.sleep(0.3)
        gate.open.set()
        r = pending()
        assert r.status_code == 200 and r.json()["fine"]


def test_the_service_answers_while_another_process_holds_the_artifact(art, demo_data):
    """A writer (here a process holding the artifact's lock after changing config.json and the
    gallery, as `hier index build` or `enroll` do) must not stall any request: the service answers
    with the version it holds, and reads the new one once the lock is free. Before, the model thread
    waited on the lock (up to 600 s)."""
    Recognizer(art).index(demo_data.train_dir / CLS)
    photo = _photos(demo_data)[0]
    with live(create_app(art)) as (http, _):
        assert _post_photo(http, photo).status_code == 200
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)"), str(art / fileio.LOCK)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            for name in (artifact.CONFIG, "gallery/listings.csv"):     # saved under the lock: new inodes
                tmp = art / (name + ".new")
                tmp.write_bytes((art / name).read_bytes())
                os.replace(tmp, art / name)
            for url in ("/predict", "/similar"):
                t = time.perf_counter()
                r = _post_photo(http, photo, url=url, timeout=10)
                assert r.status_code == 200 and time.perf_counter() - t < 5, (url, r.text)
            t = time.perf_counter()
            health = http.get("/health/ready", timeout=10).json()
            assert health["status"] == "ok" and health["stale"] is True and time.perf_counter() - t < 5
            os.environ[ADMIN_TOKEN_ENV] = "s3cret"              # an enroll would wait for the writer: 503 now
            try:
                r = http.post("/enroll", files=[("files", (photo.name, photo.read_bytes(), "image/jpeg"))],
                              data={"class": "Newcar_2025", "brand": "Borealis"}, headers={"X-Admin-Token": "s3cret"})
            finally:
                del os.environ[ADMIN_TOKEN_ENV]
            assert r.status_code == 503 and "another command" in r.json()["detail"] and r.headers["retry-after"]
        finally:
            holder.kill()
            holder.wait()
        assert _post_photo(http, photo).status_code == 200
        assert http.get("/health/ready").json()["stale"] is False


# --- listing photos --------------------------------------------------------------------------------
@pytest.fixture
def odd_gallery(art, demo_data, tmp_path):
    """A gallery whose listing ids need percent-encoding, with the photos copied beside the CSV."""
    photos = tmp_path / "photos"
    photos.mkdir()
    ids = ["a#1", "b?x=1", "a/b", "50% off", "신형 #3", "x/photo"]
    for i, src in enumerate(_photos(demo_data, n=len(ids))):
        (photos / f"{i}.jpg").write_bytes(src.read_bytes())
    csv = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": ids, "image": [f"photos/{i}.jpg" for i in range(len(ids))],
                  "price": range(len(ids)), "zip": [f"0{i}" for i in range(len(ids))],
                  "photo_url": [f"https://cdn.example/{i}.jpg" for i in range(len(ids))]}).to_csv(csv, index=False)
    Recognizer(art).index(csv)
    return ids, photos


def test_similar_gives_encoded_photo_urls_and_no_server_paths(art, demo_data, odd_gallery, tmp_path):
    """Thumbnail URLs with every id percent-encoded, no server path; the sellers' columns as given, a
    number column as numbers (prices came back as strings), a seller's own ``photo_url`` kept (hier's
    thumbnail URL overwrote it before it was named ``hier_photo_url``)."""
    ids, _ = odd_gallery
    with TestClient(create_app(art)) as client:
        r = _post_photo(client, _photos(demo_data)[0], url="/similar", params={"k": len(ids)})
        assert r.status_code == 200, r.text
        rows = r.json()["listings"]
        assert sorted(row["listing_id"] for row in rows) == sorted(ids)
        assert str(tmp_path) not in r.text and "image" not in rows[0]            # no absolute paths
        assert sorted(row["price"] for row in rows) == list(range(len(ids)))     # ints, not "0", "1"...
        assert {row["zip"] for row in rows} == {f"0{i}" for i in range(len(ids))}   # "01" stays text
        assert {row["photo_url"] for row in rows} == {f"https://cdn.example/{i}.jpg" for i in range(len(ids))}
        for row in rows:
            assert not set("#? ") & set(row["hier_photo_url"]), row["hier_photo_url"]
            thumb = client.get(row["hier_photo_url"])
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg", row
        assert client.get("/listings/a%231/photo").content == client.get(
            next(row["hier_photo_url"] for row in rows if row["listing_id"] == "a#1")).content
        assert client.get("/listings/a/photo").status_code == 404                # not a listing


def test_huge_and_damaged_listing_photos(art, demo_data, odd_gallery, caplog, capfd):
    """After indexing, one listing photo becomes a 9000 x 9000 JPEG (served, decoded at reduced scale),
    one a 9000 x 9000 PNG (refused before decoding), one damaged bytes, one is deleted: a thumbnail or
    a clean 404, no traceback, and the service stays healthy."""
    _, photos = odd_gallery
    Image.new("RGB", (9000, 9000), (200, 40, 40)).save(photos / "0.jpg", "JPEG", quality=70)
    Image.new("RGB", (9000, 9000), (40, 200, 40)).save(photos / "1.jpg", "PNG")       # a PNG named .jpg
    (photos / "2.jpg").write_bytes((photos / "2.jpg").read_bytes()[:300])
    (photos / "3.jpg").unlink()
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(art)) as client:
        t = time.perf_counter()
        r = client.get("/listings/a%231/photo")
        assert r.status_code == 200 and max(Image.open(__import__("io").BytesIO(r.content)).size) == 256
        assert time.perf_counter() - t < 10
        for quoted in ("b%3Fx%3D1", "a%2Fb", "50%25%20off"):
            r = client.get(f"/listings/{quoted}/photo")
            assert r.status_code == 404 and "listing" in r.json()["detail"], (quoted, r.text)
        assert client.get("/health/ready").json()["status"] == "ok"
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


def test_thumbnails_run_off_the_event_loop_and_off_the_model_thread(art, demo_data, odd_gallery, monkeypatch):
    """Thumbnails decode in their own threads: a slow one delays neither /health/live nor /predict.
    (Before, they decoded on the event loop and read the gallery in the model thread.)"""
    import hier.serve.routes as service

    real = service.thumbnail_jpeg
    monkeypatch.setattr(service, "thumbnail_jpeg", lambda *a: (time.sleep(1.5), real(*a))[1])
    with live(create_app(art)) as (http, _):
        slow = [_in_thread(lambda: http.get("/listings/a%231/photo")) for _ in range(4)]
        time.sleep(0.2)
        t = time.perf_counter()
        assert http.get("/health/live", timeout=2).status_code == 200
        assert _post_photo(http, _photos(demo_data)[0], timeout=5).status_code == 200
        assert time.perf_counter() - t < 1.4          # a thumbnail takes 1.5 s
        assert all(s().status_code == 200 for s in slow)


# --- what the service reports ----------------------------------------------------------------------
def test_metrics_and_the_json_access_log(art, demo_data, odd_gallery, caplog):
    caplog.set_level(logging.INFO, logger="hier.access")
    photo = _photos(demo_data)[0]
    with TestClient(create_app(art)) as client:
        for _ in range(3):
            assert _post_photo(client, photo).status_code == 200
        assert client.get("/listings/a%231/photo").status_code == 200
        assert _post_photo(client, photo, url="/predict", params={"topk": 0}).status_code == 422
        text = client.get("/metrics").text
    for series in ('hier_requests_total{method="POST",route="/predict",status="200"} 3.0',
                   'hier_requests_total{method="POST",route="/predict",status="422"} 1.0',
                   'hier_requests_total{method="GET",route="/listings/{listing_id:path}/photo",status="200"} 1.0',
                   'hier_request_seconds_bucket{le="0.005",route="/predict"}', 'hier_batch_size_count 3.0',
                   'hier_queue_depth{worker="model"} 0.0', "hier_artifact_classes 12.0"):
        assert series in text, series
    assert re.search(r'hier_artifact_info\{fingerprint="[0-9a-f]{32}",path="[^"]+"\} 1.0', text)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hier.access"]
    assert [(x["method"], x["path"], x["status"]) for x in lines[:3]] == [("POST", "/predict", 200)] * 3
    assert lines[3]["path"] == "/listings/a#1/photo" and lines[3]["route"] == "/listings/{listing_id:path}/photo"
    assert all(x["ms"] > 0 for x in lines) and lines[4]["status"] == 422


def test_a_16_bit_listing_photo_gets_a_thumbnail_of_its_8_bit_version(tmp_path):
    """Thumbnails go through the one decoder: a 16-bit photo is scaled, not clipped to white."""
    from io import BytesIO

    import numpy as np
    from PIL import Image

    from hier.serve.thumbnails import thumbnail_jpeg

    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (200, 1))
    wide, narrow = tmp_path / "deep.png", tmp_path / "plain.png"
    Image.fromarray(ramp).save(wide)
    Image.fromarray((ramp // 257).astype(np.uint8)).save(narrow)
    deep, plain = (np.asarray(Image.open(BytesIO(thumbnail_jpeg(str(p), (1,))))).astype(float) for p in (wide, narrow))
    assert abs(deep.mean() - plain.mean()) < 2 and deep.mean() < 200, (deep.mean(), plain.mean())


def test_slow_clients_are_let_go_and_the_service_answers_meanwhile(art, demo_data):
    """Before: with ``--timeout 10`` a slow-headers and a slow-body connection were still open after 75 s,
    and 30 clients each sending 9 MB and then trickling pinned 270 MB of spooled temporary files. Now a
    request's headers have a deadline (the connection is closed), its body a deadline and a minimum rate
    (answered 408), and normal requests are answered meanwhile."""
    photo = sorted((demo_data.train_dir / "Cinder_Rook_2019_2023").glob("*.jpg"))[0].read_bytes()
    app = create_app(art, body_timeout_s=2.0, min_body_rate=1024)
    with served(app, header_timeout_s=1.0) as url:
        host, port = url.removeprefix("http://").split(":")
        slow_headers = socket.create_connection((host, int(port)))
        slow_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")          # and never the rest
        slow_body = socket.create_connection((host, int(port)))
        slow_body.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                          b"Content-Length: 100000\r\n\r\n--b\r\n")                 # then it stalls
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.post("/predict", files={"file": ("a.jpg", photo, "image/jpeg")}).status_code == 200
        started = time.monotonic()
        for sock in (slow_headers, slow_body):
            sock.settimeout(10)
        assert slow_headers.recv(100) == b""                                    # closed by the server
        answer = b"".join(iter(lambda: slow_body.recv(1000), b""))            # until the server closes it
        assert answer.startswith(b"HTTP/1.1 408") and b"send it at once" in answer, answer
        assert time.monotonic() - started < 5
        slow_headers.close()
        slow_body.close()


def test_listings_whose_ids_are_dot_segments_get_a_photo_url_that_works(art, demo_data, tmp_path):
    """Before: the ``photo_url`` of listing ids ``.`` and ``..`` (``/listings/./photo``) lost its id to the
    client's dot-segment normalisation, encoded or not, and fetched another listing's photo or a 404."""
    photos = _photos(demo_data, n=3)
    csv = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": [".", "..", "plain"], "image": [str(p) for p in photos]}).to_csv(csv, index=False)
    Recognizer(art).index(csv)
    with TestClient(create_app(art)) as client:
        rows = _post_photo(client, photos[0], url="/similar", params={"k": 3}).json()["listings"]
        by_id = {row["listing_id"]: row["hier_photo_url"] for row in rows}
        assert set(by_id) == {".", "..", "plain"}
        for listing_id, url in by_id.items():
            thumb = client.get(url)
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg", (listing_id, url)
        assert client.get(by_id["."]).content != client.get(by_id[".."]).content


@pytest.mark.slow
def test_hier_serve_writes_its_audit_and_access_lines_on_stderr(art, tmp_path):
    """``hier serve`` attached a handler to ``hier.access`` only, so the ``hier.audit`` lines the docs
    promise (one JSON line per enrollment change, done or refused) were dropped at Python's default
    WARNING level. A real ``hier serve`` process: a refused DELETE is one audit line on stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, ADMIN_TOKEN_ENV: "s3cret"}
    proc = subprocess.Popen([sys.executable, "-m", "hier", "serve", str(art), "--port", str(port)], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "hier serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.delete(f"http://127.0.0.1:{port}/enroll/없는클래스_2025", headers={"X-Admin-Token": "s3cret",
                                                                                  "X-Request-ID": "op-7"})
        assert r.status_code == 404
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    audit = [x for x in lines if x.get("action") == "unenroll"]
    assert len(audit) == 1 and audit[0]["class"] == "없는클래스_2025" and audit[0]["done"] is False, err
    assert audit[0]["request_id"] == "op-7"
    assert any(x.get("path", "").startswith("/enroll/") for x in lines if "action" not in x), err   # access line
    assert err.splitlines()[0].startswith("loading "), err          # something before the seconds of loading
