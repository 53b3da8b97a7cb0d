"""`hier serve`: the API through FastAPI's TestClient, malformed and fuzzed uploads, a bounded load test
on loopback, and the upload page driven in headless Chromium (skipped where Chromium is absent)."""
from __future__ import annotations

import io
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import chromium, run_cli, served, write_bomb
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hier import Recognizer
from hier.drawing import HANGUL_RANGE
from hier.serve import ADMIN_TOKEN_ENV, create_app
from hier.serve.loadtest import load_test

CLS = "Cinder_Rook_2019_2023"


@pytest.fixture
def client(art):
    with TestClient(create_app(art, max_upload_mb=0.5)) as c:
        yield c


def _photos(demo_data, cls=CLS, n=4) -> list[Path]:
    return sorted((demo_data.train_dir / cls).glob("*.jpg"))[:n]


def _post(client, body: bytes, name="car.jpg", url="/predict"):
    return client.post(url, files={"file": (name, body, "image/jpeg")})


def test_predict_answers_as_the_recognizer_does(client, art, demo_data):
    photo = _photos(demo_data)[0]
    r = client.post("/predict", params={"topk": 3}, files={"file": ("x.jpg", photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    got, want = r.json(), Recognizer(art).predict(photo, topk=3)[0]
    assert (got["brand"], got["model"], got["fine"], got["years"]) == (want.brand, want.model, want.fine, want.years)
    assert got["p"] == pytest.approx(want.p, abs=1e-6) and got["p"] <= got["p_model"] <= got["p_brand"] + 1e-9
    assert [t["class"] for t in got["topk"]] == [t["class"] for t in want.topk] and len(got["topk"]) == 3
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/similar", "/enroll", "/health", "/metrics", "/listings/{listing_id}/photo",
            "/enroll/{name}"} <= set(schema["paths"]), set(schema["paths"])     # every route serving.md lists
    photo_route = schema["paths"]["/listings/{listing_id}/photo"]["get"]["responses"]
    assert "image/jpeg" in photo_route["200"]["content"] and "404" in photo_route
    # typed: each answer's schema is in /docs, and the answer has exactly its fields
    answer = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/Answer"}
    fields = schema["components"]["schemas"]["Answer"]["properties"]
    assert set(got) == set(fields) and set(got["topk"][0]) == set(schema["components"]["schemas"]["RankedClass"]["properties"])
    assert {"Similar", "Listing", "Enrolled", "Ready", "Live"} <= set(schema["components"]["schemas"])
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    # Hangul on a viewer without a Korean font: the page names the font the service serves
    font = client.get("/hangul.ttf")
    assert "url(hangul.ttf)" in page.text and font.status_code == 200 and font.content[:4] == b"\x00\x01\x00\x00"
    assert HANGUL_RANGE in page.text                                          # the range the reports embed
    assert client.head("/hangul.ttf").status_code == 200                      # HEAD as GET (it was 405)


def test_similar_needs_an_index_then_returns_listings_with_photos(client, art, demo_data):
    photo = _photos(demo_data)[0]
    r = _post(client, photo.read_bytes(), url="/similar")
    assert r.status_code == 409 and "hier index build" in r.json()["detail"]
    Recognizer(art).index(demo_data.train_dir)
    r = client.post("/similar", params={"k": 4}, files={"file": ("q.jpg", photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    rows = r.json()["listings"]
    assert len(rows) == 4 and rows[0]["hier_similarity"] >= rows[-1]["hier_similarity"]
    assert rows[0]["listing_id"] == f"{CLS}/{photo.stem}"          # the photo itself is in the gallery
    thumb = client.get(rows[0]["hier_photo_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    escape = client.get("/listings/..%2F..%2F..%2Fetc%2Fpasswd/photo")      # reaches the handler as one id
    assert escape.status_code == 404 and "no photo for listing '../../../etc/passwd'" in escape.json()["detail"]
    assert client.get("/health").json()["gallery"] is True


def test_enroll_needs_the_admin_token_and_is_answered_at_once(client, art, demo_data, monkeypatch, capsys):
    shots = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in _photos(demo_data, "Borealis_Lynx_2019_2022")]
    form = {"class": "Newcar_2025", "brand": "Borealis", "years": "2025"}
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert client.post("/enroll", files=shots, data=form).status_code == 403
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    assert client.post("/enroll", files=shots, data=form, headers={"X-Admin-Token": "wrong"}).status_code == 401
    before = client.get("/health").json()["classes"]
    r = client.post("/enroll", files=shots, data=form, headers={"X-Admin-Token": "s3cret"})
    assert r.status_code == 200, r.text
    assert r.json()["class"] == "Newcar_2025" and client.get("/health").json()["classes"] == before + 1
    assert r.json()["offset"] >= 0 and r.json()["calibrated"]           # bounded by the default budget
    r = client.post("/predict", params={"topk": 50}, files=[("file", shots[0][1])])
    assert "Newcar_2025" in [t["class"] for t in r.json()["topk"]]
    # a class enrolled by the CLI while the service runs is answered too
    code, _, _ = run_cli("enroll", art, "--class", "Othercar_2025", "--brand", "Borealis", "--images",
                         _photos(demo_data, "Borealis_Lynx_2019_2022")[0], capsys=capsys)
    assert code == 0 and client.get("/health").json()["classes"] == before + 2
    bad = client.post("/enroll", files=[("files", ("x.jpg", b"not a photo", "image/jpeg"))], data=form,
                      headers={"X-Admin-Token": "s3cret"})
    assert bad.status_code == 415 and client.get("/health").json()["classes"] == before + 2
    bad = client.post("/enroll", files=shots, data={**form, "max_base_drop": "150"}, headers={"X-Admin-Token": "s3cret"})
    assert bad.status_code == 400 and "--max-base-drop" in bad.json()["detail"]
    assert client.get("/health").json()["classes"] == before + 2


def test_an_operator_unenrolls_over_http_and_every_change_is_audited(client, demo_data, monkeypatch, caplog):
    """``DELETE /enroll/{class}`` beside ``/enroll`` (admin only); one ``hier.audit`` line per change, done
    or refused, carrying the request id the client sent back in ``X-Request-ID`` (a new one otherwise).
    A class that is not enrolled is 404 (it was 400, as a malformed request)."""
    import json
    import logging
    shots = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in _photos(demo_data, "Borealis_Lynx_2019_2022")]
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    admin = {"X-Admin-Token": "s3cret"}
    before = client.get("/health").json()["classes"]
    with caplog.at_level(logging.INFO, logger="hier.audit"):
        r = client.post("/enroll", files=shots, data={"class": "신형모델_2025", "brand": "Borealis"},
                        headers={**admin, "X-Request-ID": "dealer-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "dealer-42"
        assert "answered as '신형모델_2025'" in r.json()["summary"]
        assert client.delete("/enroll/신형모델_2025").status_code == 401           # no token given
        gone = client.delete("/enroll/신형모델_2025", headers=admin)
        assert gone.status_code == 200 and gone.json() == {"class": "신형모델_2025", "classes": before, "base": False}
        again = client.delete("/enroll/신형모델_2025", headers=admin)
        assert again.status_code == 404 and "not an enrolled class" in again.json()["detail"]   # was 400
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hier.audit"]
    assert [(x["action"], x["class"], x["done"]) for x in lines] == [
        ("enroll", "신형모델_2025", True), ("unenroll", "신형모델_2025", True), ("unenroll", "신형모델_2025", False)]
    assert lines[0]["request_id"] == "dealer-42" and lines[0]["shots"] == len(shots)
    assert len(lines[1]["request_id"]) == 32 and lines[1]["request_id"] != lines[2]["request_id"]
    # a known class takes photos over HTTP too, as `hier enroll --add-shots`; refused without the field
    known = {"class": "Borealis_Lynx_2019_2022"}
    refused = client.post("/enroll", files=shots, data=known, headers=admin)
    assert refused.status_code == 400 and "add_shots" in refused.json()["detail"]
    added = client.post("/enroll", files=shots, data={**known, "add_shots": "true"}, headers=admin)
    assert added.status_code == 200 and added.json()["base"] and added.json()["added"] == len(shots)
    assert client.get("/health/live", headers={"X-Request-ID": "bad id"}).headers["x-request-id"] != "bad id"


def test_uploaded_shots_count_by_content_as_the_cli_counts_their_files(client, art, demo_data, monkeypatch, capsys):
    """``/enroll`` hands the decoded uploads and the MD5 of their bytes to enrollment (no temporary PNGs):
    a photo enrolled by the CLI and uploaded again is the same shot, and a copy uploaded twice counts once.
    Before, uploads were re-encoded to PNG files whose digests matched no file the CLI had read."""
    photos = _photos(demo_data, "Borealis_Lynx_2019_2022", n=3)
    code, _, err = run_cli("enroll", art, "--class", "Newcar_2025", "--brand", "Borealis", "--images", photos[0],
                           capsys=capsys)
    assert code == 0, err
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    shots = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in (photos[0], photos[1], photos[1], photos[2])]
    r = client.post("/enroll", files=shots, data={"class": "Newcar_2025"}, headers={"X-Admin-Token": "s3cret"})
    assert r.status_code == 200, r.text
    assert (r.json()["added"], r.json()["total"], r.json()["duplicates"]) == (2, 3, 2)


def test_malformed_uploads_are_4xx_and_the_service_stays_healthy(client, demo_data, tmp_path):
    jpeg = _photos(demo_data)[0].read_bytes()
    write_bomb(tmp_path / "bomb.png")
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(big, "PNG")
    cases = {"not an image": (b"hello, I am a README", 415), "0 bytes": (b"", 400),
             "over the limit": (big.getvalue(), 413), "truncated JPEG": (jpeg[: len(jpeg) // 2], 400),
             "decompression bomb": ((tmp_path / "bomb.png").read_bytes(), 413)}
    for what, (body, status) in cases.items():
        r = _post(client, body)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert r.json()["detail"], what
    assert client.post("/predict").status_code == 422                       # no file at all
    assert client.post("/predict", params={"topk": 0}, files={"file": ("a.jpg", jpeg)}).status_code == 422
    assert client.get("/health").json()["status"] == "ok"
    assert _post(client, jpeg).status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_uploads_never_break_the_service(client, demo_data, data):
    """Random bytes, and real JPEGs cut or with bytes overwritten: a 200 or a 4xx, never a 5xx."""
    jpeg = _photos(demo_data)[1].read_bytes()
    kind = data.draw(st.sampled_from(["random", "cut", "flipped"]))
    if kind == "random":
        body = data.draw(st.binary(max_size=4096))
    elif kind == "cut":
        body = jpeg[:data.draw(st.integers(0, len(jpeg)))]
    else:
        body = bytearray(jpeg)
        for _ in range(data.draw(st.integers(1, 20))):
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
        body = bytes(body)
    r = _post(client, body)
    assert r.status_code in (200, 400, 413, 415), (kind, r.status_code, r.text)


@pytest.mark.slow
def test_bounded_load_test_on_loopback(art, demo_data):
    """2,000 requests from 8 concurrent clients against a real uvicorn server: zero errors, and the
    micro-batcher really batched (fewer forward passes than photos)."""
    app = create_app(art)
    with served(app) as url:
        stats = load_test(url, _photos(demo_data, n=8), requests=2000, clients=8)
        health = httpx.get(url + "/health").json()
    print(f"\nload test: {stats}")
    assert stats["requests"] == 2000 and stats["errors"] == 0, stats["first_error"]
    assert stats["p95_ms"] < 10_000 and stats["throughput_rps"] > 2000 / 600     # no request near a stall
    assert health["batched_photos"] == 2000 and health["batches"] < 2000


def test_serve_refuses_a_port_in_use_in_one_line(art, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli("serve", art, "--port", taken.getsockname()[1], capsys=capsys)
    assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("serve", art.parent / "nothing", capsys=capsys)
    assert code == 2 and "artifact not found" in err
    code, _, err = run_cli("serve", art.parent, capsys=capsys)
    assert code == 2 and "is not a hier artifact" in err


@pytest.mark.slow
def test_upload_page_in_headless_chromium(art, demo_data, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    Recognizer(art).index(demo_data.train_dir)
    photo = _photos(demo_data)[0]
    with served(create_app(art)) as url, chromium() as browser:
        browser.get(url + "/")
        browser.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "answer").is_displayed()
                                         and b.find_elements(By.CSS_SELECTOR, "#listings img"))
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
        want = Recognizer(art).predict(photo)[0]
        path = browser.find_element(By.ID, "path").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#topk tr")
        boxes = [browser.find_element(By.CSS_SELECTOR, sel).rect for sel in ("h1", "#drop", "#preview", "#path")]
        browser.save_screenshot(str(tmp_path / "page.png"))
        # the page's Hangul font is one Chromium takes (the shipped file was refused: "OTS parsing error")
        hangul = browser.execute_async_script("const done = arguments[0]; document.fonts.load('16px \"hier-hangul\"', "
                                              "'그랜저').then(f => done(f.map(x => x.status))).catch(e => done(String(e)))")
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" or "font" in e["message"]]
    assert hangul == ["loaded"], hangul
    assert want.brand in path and want.model in path and want.years in path
    assert len(rows) == 5 and browser is not None
    # title, drop zone, photo and answer stacked without overlapping (the drop zone once covered the title)
    assert all(a["y"] + a["height"] <= b["y"] for a, b in zip(boxes, boxes[1:])), boxes
    assert not logs, logs
    assert (tmp_path / "page.png").stat().st_size > 10_000


@pytest.mark.slow
def test_docs_render_with_no_network(art, tmp_path):
    """/docs in headless Chromium that can reach nothing but the loopback (every other host resolves to
    nothing): Swagger UI comes from files installed with hier and lists the routes (blank before: a CDN)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    offline = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
    with served(create_app(art)) as url, chromium(offline) as browser:
        browser.get(url + "/docs")
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        title = browser.find_element(By.CSS_SELECTOR, ".info .title").text
        requested = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        browser.save_screenshot(str(tmp_path / "docs.png"))
    assert {"/predict", "/similar", "/enroll"} <= paths and title.startswith("hier")
    assert requested and all(r.startswith(url) for r in requested), requested
