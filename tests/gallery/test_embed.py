"""``hier embed`` shards and the gallery built from them."""
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from hier.errors import HierError
from hier.gallery import Gallery, read_listings
from hier.recognizer import Recognizer
from hier.runtime import Predictor
from hier.services import embedding


@pytest.fixture
def listings(demo_data, tmp_path):
    """The drawn test photos as a CSV with a seller's columns that pandas would retype."""
    photos = sorted((demo_data.train_dir.parent / "test").glob("*.jpg"))
    path = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": [f"L{i:03d}" for i in range(len(photos))], "image": [str(p) for p in photos],
                  "zip": ["01234"] * len(photos), "price": ["n/a"] + ["1.50"] * (len(photos) - 1)}).to_csv(
        path, index=False, encoding="utf-8")
    return path


def test_shards_hold_every_listing_once_with_the_embeddings_of_the_predictor(art, listings, tmp_path):
    out = tmp_path / "emb"
    table = read_listings(listings)
    for i in range(3):
        embedding.embed(art, table, out, (i, 3))
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    vectors, rows = embedding.read_embeddings(out)
    assert sorted(rows["listing_id"]) == sorted(table["listing_id"]) and len(rows) == len(table) == 24
    rec = Recognizer(art)
    direct = Predictor(rec.net)(list(rows["image"]))
    assert np.abs(vectors - direct["embedding"]).max() < 1e-5
    assert list(rows["hier_class"]) == [rec.taxonomy.classes[i] for i in direct["answer"]]
    assert set(rows["zip"]) == {"01234"} and rows["price"].iloc[0] == "n/a"       # sellers' text kept as text
    assert json.loads(pq.read_schema(out / embedding.part_name(1, 3)).metadata[b"hier"])["fingerprint"] \
        == rec.net.fingerprint()


def test_a_gallery_from_shards_answers_as_one_built_from_photos(art, listings, tmp_path):
    rec = Recognizer(art)
    for i in range(2):
        rec.embed_shard(listings, tmp_path / "emb", (i, 2))
    queries = read_listings(listings)["image"].iloc[:3].tolist()
    rec.index(listings)
    built = [rec.similar(q, k=5) for q in queries]
    from_shards = rec.index_from_embeddings(tmp_path / "emb")
    assert len(from_shards) == 24
    again = [Recognizer(art).similar(q, k=5) for q in queries]
    for a, b in zip(built, again):
        assert list(a.columns) == list(b.columns)
        assert list(a["listing_id"]) == list(b["listing_id"])
        assert np.abs(a["hier_similarity"].to_numpy(float) - b["hier_similarity"].to_numpy(float)).max() < 1e-5
    assert Gallery.load(art).fingerprint == rec.net.fingerprint()


def test_missing_mixed_foreign_repeated_or_damaged_shards_are_refused(art, listings, tmp_path):
    table = read_listings(listings)
    out = tmp_path / "emb"
    embedding.embed(art, table, out, (0, 2))
    with pytest.raises(HierError, match="shard 1/2 is missing"):
        embedding.read_embeddings(out)
    with pytest.raises(HierError, match="exists"):
        embedding.embed(art, table, out, (0, 2))                 # a part is never overwritten
    shutil.copy(out / embedding.part_name(0, 2), out / embedding.part_name(1, 2))
    with pytest.raises(HierError, match="L000.* two rows"):
        embedding.read_embeddings(out)
    with pytest.raises(HierError, match="other weights"):
        embedding.read_embeddings(out, fingerprint="0" * 16)
    (out / embedding.part_name(0, 1)).write_bytes(b"not parquet")
    with pytest.raises(HierError, match="mixes shards"):
        embedding.read_embeddings(out)
    (out / embedding.part_name(0, 2)).unlink()
    (out / embedding.part_name(1, 2)).unlink()
    with pytest.raises(HierError, match="not a `hier embed` shard"):
        embedding.read_embeddings(out)
    with pytest.raises(HierError, match="no embedding shards"):
        embedding.read_embeddings(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["2/2", "1", "-1/3", "a/b", "0/0", ""])
def test_a_bad_shard_is_one_line(art, listings, tmp_path, text, capsys):
    code, _, err = run_cli("embed", art, listings, "--out", tmp_path / "e", "--shard", text, capsys=capsys)
    assert code == 2 and err.strip().startswith("error: --shard") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_cli_embed_then_build_from_embeddings(art, listings, tmp_path, capsys):
    emb = tmp_path / "emb"
    assert run_cli("embed", art, listings, "--out", emb, capsys=capsys)[0] == 0
    code, out, _ = run_cli("index", "build", art, "--from-embeddings", emb, capsys=capsys)
    assert code == 0 and "indexed 24" in out
    code, _, err = run_cli("index", "build", art, capsys=capsys)
    assert code == 2 and "one of them" in err
