"""`hier index` and `hier similar` on a copy of the tiny artifact: build, search, add and remove with stable
ids, the ivf and hnsw kinds, search in the whitened embedding, a gallery of other weights refused until it
is rebuilt, a damaged or emptied gallery. Then users' listings (issues 7 and 15): sellers' columns kept as
written, a repeated listing id named, a full disk during `index add`, Korean listings under an ASCII locale."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import (
    ROOT,
    ends_in_one_error,
    files_and_modes,
    full_disk,
    one_error_line,
    one_error_line_after_warnings,
    photos_of,
    plain_photo,
    run_cli,
)

from hier import artifact
from hier.runtime import Predictor
from hier.services.labelling import SEARCH_SHRINK


def test_index_build_similar_add_remove(art, demo_data, tmp_path, capsys):
    listings = tmp_path / "listings.csv"
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[::3]
    pd.DataFrame({"listing_id": [f"L{i:03d}" for i in range(len(photos))], "image": photos,
                  "price": np.arange(len(photos)) * 100}).to_csv(listings, index=False)
    code, out, err = run_cli("similar", art, photos[0], capsys=capsys)
    assert code == 2 and "no index" in err
    assert run_cli("index", "build", art, listings, capsys=capsys)[0] == 0
    code, out, _ = run_cli("similar", art, photos[0], "--k", "5", "--format", "json", capsys=capsys)
    rows = json.loads(out)
    assert code == 0 and len(rows) == 5 and rows[0]["listing_id"] == "L000" and rows[0]["price"] == 0
    assert rows[0]["hier_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert all(a["hier_similarity"] >= b["hier_similarity"] for a, b in zip(rows, rows[1:]))
    code, out, _ = run_cli("similar", art, photos[0], "--k", "4", "--same-brand", "--format", "json", capsys=capsys)
    assert code == 0 and len({r["hier_brand"] for r in json.loads(out)}) == 1
    ids = pd.read_csv(art / "gallery" / "listings.csv", dtype={"listing_id": str}).set_index("listing_id")["hier_id"]
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(photos[1], extra / "NEW1.jpg")
    assert run_cli("index", "add", art, extra, capsys=capsys)[0] == 0
    code, _, err = run_cli("index", "add", art, extra, capsys=capsys)
    assert code == 2 and "already in the index" in err
    assert run_cli("index", "remove", art, "L000", "L001", capsys=capsys)[0] == 0
    after = pd.read_csv(art / "gallery" / "listings.csv", dtype={"listing_id": str}).set_index("listing_id")["hier_id"]
    assert len(after) == len(ids) + 1 - 2 and "L000" not in after.index
    assert (after.loc[ids.index[2:]] == ids.iloc[2:]).all()                        # ids stable
    code, out, _ = run_cli("similar", art, photos[1], "--k", "1", "--format", "json", capsys=capsys)
    assert json.loads(out)[0]["listing_id"] == "NEW1"                               # same photo, new id


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_other_index_kinds(kind, art, demo_data, capsys):
    assert run_cli("index", "build", art, demo_data.train_dir / "Aurora_Nova_2015_2018", "--index", kind,
                   capsys=capsys)[0] == 0
    photo = sorted((demo_data.train_dir / "Aurora_Nova_2015_2018").glob("*.jpg"))[3]
    code, out, _ = run_cli("similar", art, photo, "--k", "3", "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out)[0]["listing_id"] == photo.stem


def test_a_gallery_searches_in_the_whitened_embedding(art, legacy_art, demo_data, tmp_path, capsys):
    """An artifact served by its class statistics builds galleries that rank listings by cosine in the
    whitened embedding (S^-1/2 z, renormalised); one served by its trained head, by plain cosine."""
    import faiss
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[::4]
    listings = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": [f"L{i:03d}" for i in range(len(photos))], "image": photos}).to_csv(listings,
                                                                                                  index=False)
    for a, whitened in ((art, True), (legacy_art, False)):
        assert run_cli("index", "build", a, listings, capsys=capsys)[0] == 0
        index = faiss.read_index(str(a / "gallery" / "index.faiss"))
        assert isinstance(index, faiss.IndexPreTransform) == whitened
        net = artifact.load(a)[0]
        z = Predictor(net)(photos)["embedding"]
        if whitened:
            z = z @ net.statistics.whitening(SEARCH_SHRINK)
            z /= np.linalg.norm(z, axis=1, keepdims=True)
        expected = [f"L{i:03d}" for i in np.argsort(-(z[1:2] @ z.T)[0], kind="stable")[:6]]
        code, out, _ = run_cli("similar", a, photos[1], "--k", "6", "--format", "json", capsys=capsys)
        got = json.loads(out)
        assert code == 0 and [r["listing_id"] for r in got] == expected
        assert got[0]["hier_similarity"] == pytest.approx(1.0, abs=1e-4)


def test_a_gallery_of_other_weights_is_refused_until_rebuilt(art, demo_data, tmp_path, capsys):
    """Before: `train --resume` into an artifact with a gallery left the listings' vectors of the old
    weights in it, searched silently against queries of the new ones."""
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[::6]
    listings = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": [f"L{i:03d}" for i in range(len(photos))], "image": photos,
                  "price": ["n/a"] + [str(i) for i in range(1, len(photos))], "kind": "sedan"}).to_csv(listings, index=False)
    assert run_cli("index", "build", art, listings, capsys=capsys)[0] == 0
    assert json.loads((art / "gallery" / "gallery.json").read_text())["fingerprint"] == artifact.read_config(art)["fingerprint"]
    before = artifact.read_config(art)["fingerprint"]
    for epochs in (13, 16, 20):       # the best weights change once a resumed epoch beats the best one
        code, _, err = run_cli("train", demo_data.train_dir, "--out", art, "--resume", "--epochs", epochs, capsys=capsys)
        assert code == 0 and f"hier index rebuild {art}" in err
        if artifact.read_config(art)["fingerprint"] != before:
            break
    assert artifact.read_config(art)["fingerprint"] != before
    code, _, err = run_cli("similar", art, photos[2], capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and f"hier index rebuild {art}" in err
    assert run_cli("index", "rebuild", art, capsys=capsys)[0] == 0
    code, out, _ = run_cli("similar", art, photos[2], "--k", "2", "--format", "json", capsys=capsys)
    rows = json.loads(out)
    assert code == 0 and rows[0]["listing_id"] == "L002" and rows[0]["hier_similarity"] == pytest.approx(1, abs=1e-4)
    saved = pd.read_csv(art / "gallery" / "listings.csv", dtype=str, keep_default_na=False)
    assert saved["price"].iloc[0] == "n/a" and len(saved) == len(photos)        # the sellers' cells as given
    assert (saved["kind"] == "sedan").all()                    # a seller's `kind` column is the seller's


@pytest.mark.parametrize("damage", ["listings.csv gone", "index.faiss cut short"])
def test_a_damaged_gallery_is_one_line(damage, art, demo_data, capsys):
    """A gallery folder missing a file, or with its index cut short: one line naming the rebuild
    (it was a FileNotFoundError / RuntimeError traceback)."""
    folder = demo_data.train_dir / "Aurora_Nova_2015_2018"
    assert run_cli("index", "build", art, folder, capsys=capsys)[0] == 0
    if damage == "listings.csv gone":
        (art / "gallery" / "listings.csv").unlink()
    else:
        index = art / "gallery" / "index.faiss"
        index.write_bytes(index.read_bytes()[:100])
    code, _, err = run_cli("similar", art, sorted(folder.glob("*.jpg"))[0], capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is damaged" in lines[0] and "hier index build" in lines[0], err


def test_an_emptied_gallery_answers_nothing_and_rebuild_says_why(art, demo_data, capsys):
    """Every listing removed: `similar` returned an AssertionError and `rebuild` a KeyError."""
    folder = demo_data.train_dir / "Aurora_Nova_2015_2018"
    assert run_cli("index", "build", art, folder, capsys=capsys)[0] == 0
    ids = [p.stem for p in sorted(folder.glob("*.jpg"))]
    assert run_cli("index", "remove", art, *ids, capsys=capsys)[0] == 0
    code, out, _ = run_cli("similar", art, sorted(folder.glob("*.jpg"))[0], "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out) == []
    code, _, err = run_cli("index", "rebuild", art, capsys=capsys)
    assert code == 2 and "lists no listings" in err and err.count("error:") == 1


# --- listing metadata (issue 7, item 8) -----------------------------------------------------------------

def test_sellers_columns_are_kept(art, demo_data, tmp_path, capsys):
    photos = photos_of(demo_data, "Aurora_Nova_2015_2018")[:4]
    listings = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": ["a", "b", "c", "d"], "image": photos, "brand": ["Kia"] * 4,
                  "model": ["K5"] * 4, "id": [11, 12, 13, 14], "kind": ["sedan"] * 4, "class": ["x"] * 4,
                  "similarity": ["n/a"] * 4}).to_csv(listings, index=False)
    code, _, err = run_cli("index", "build", art, listings, capsys=capsys)
    assert code == 0, err
    code, out, _ = run_cli("similar", art, photos[0], "--k", "4", "--format", "json", capsys=capsys)
    rows = json.loads(out)
    assert code == 0 and rows[0]["listing_id"] == "a"
    assert {(r["brand"], r["model"], r["id"], r["kind"], r["class"], r["similarity"]) for r in rows} == \
        {("Kia", "K5", i, "sedan", "x", "n/a") for i in (11, 12, 13, 14)}   # as written: text, and plain numbers
    assert rows[0]["hier_brand"] in artifact.load(art)[1].brands and rows[0]["hier_similarity"] > 0.99
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"listing_id": ["a"], "image": photos[:1], "hier_brand": ["x"]}).to_csv(bad, index=False)
    code, _, err = run_cli("index", "add", art, bad, capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "hier_brand" in err


# --- repeats and names (issue 15, item 13) --------------------------------------------------------------

def test_a_repeated_listing_id_names_both_files_or_both_rows(art, tmp_path, capsys):
    folder = tmp_path / "listings"
    plain_photo(folder / "a.jpg")
    plain_photo(folder / "a.png", (10, 200, 10))
    code, _, err = run_cli("index", "build", art, folder, capsys=capsys)
    assert one_error_line(code, err) and "listing_id 'a' repeats" in err and "a.jpg and a.png" in err, err
    csv = tmp_path / "listings.csv"
    csv.write_text(f"listing_id,image\nx,{folder / 'a.jpg'}\ny,{folder / 'a.png'}\nx,{folder / 'a.png'}\n",
                   encoding="utf-8")
    code, _, err = run_cli("index", "build", art, csv, capsys=capsys)
    assert one_error_line(code, err) and "listing_id 'x' repeats (rows 2 and 4)" in err, err
    assert not (art / "gallery").exists()


# --- a full disk (issue 15, item 10) --------------------------------------------------------------------

def test_a_full_disk_during_index_add_is_one_line(art, demo_data, tmp_path, monkeypatch, capsys):
    import faiss
    assert run_cli("index", "build", art, demo_data.train_dir / "Aurora_Nova_2015_2018", capsys=capsys)[0] == 0
    before = files_and_modes(art)
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(photos_of(demo_data, n=5)[0], more / "NEW1.jpg")
    monkeypatch.setattr(faiss, "write_index", full_disk)
    code, _, err = run_cli("index", "add", art, more, capsys=capsys)
    assert ends_in_one_error(code, err) and "no space left on device" in err and "the artifact is unchanged" in err, err
    assert files_and_modes(art) == before


# --- an ASCII locale (issue 15, item 11) ----------------------------------------------------------------

@pytest.mark.slow
def test_listings_and_test_csvs_in_an_ascii_locale(art, demo_data, tmp_path):
    """Under LANG=C without UTF-8 mode, Korean listings and IDs are read, indexed and read back."""
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[:2]
    csv = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": ["신형모델_1", "신형모델_2"], "image": photos, "판매자": ["김", "이"]}) \
        .to_csv(csv, index=False, encoding="utf-8")
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom hier.gallery import Gallery, read_listings\n"
                      "from hier.services.indexing import build\n"
                      "build(sys.argv[1], read_listings(Path(sys.argv[2])))\n"
                      "g = Gallery.load(sys.argv[1])\n"
                      "print(sorted(g.listings['listing_id']) == ['신형모델_1', '신형모델_2'],"
                      " sorted(g.listings['판매자']) == ['김', '이'])\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, str(script), str(art), str(csv)], capture_output=True, text=True,
                       env=env, timeout=300, encoding="utf-8")
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr[-2000:]
