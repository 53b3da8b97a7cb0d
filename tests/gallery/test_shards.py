"""Galleries sharded by time: a day's listings in a small shard that reuses the trained index (no
retraining, nothing else rewritten), one search over every shard that answers as one index of
everything, whole shards dropped or merged, and a gallery of one index (as hier wrote it before) read
as one shard."""
import json

import faiss
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from test_gallery import _clustered, _exact, _listings, _one_line_error, _recall, _whitening

from hier import artifact, fileio
from hier.artifact.files import VECTORS
from hier.errors import HierError, HierWarning
from hier.gallery import BRAND, ID, Gallery, factory_string, shard_counts, shard_name, store
from hier.gallery.vectors import _read_ahead
from hier.recognizer import Recognizer
from hier.services import indexing

D = 64


def _rows(n, start=0):
    return pd.DataFrame({"listing_id": [f"L{i}" for i in range(start, start + n)],
                         BRAND: np.array(list("ABCDE"))[np.arange(start, start + n) % 5]})


def _two_ways(kind, w=None):
    """One gallery of 4,000 vectors in its base shard and the same vectors as base (2,500) + shards d1
    (1,000) and d2 (500, after an empty d0), both trained on the base's 2,500."""
    x = _clustered(4000, d=D)
    one = Gallery.build(x[:2500], _rows(2500), kind, w)
    sharded = Gallery.build(x[:2500], _rows(2500), kind, w)
    one.add(x[2500:], _rows(1500, 2500))
    sharded.add(x[:0], _rows(0), "d0")
    sharded.add(x[2500:3500], _rows(1000, 2500), "d1")
    sharded.add(x[3500:], _rows(500, 3500), "d2")
    return x, one, sharded


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind, whiten", [("flat", False), ("flat", True), ("ivf", False), ("pq", True)])
def test_sharded_search_answers_as_one_index_of_everything(kind, whiten):
    """Shards cloned from the one trained empty index: flat ones searched by IndexShards (exact), the IVF
    kinds as one IVF index over every shard's lists (the same quantizer), so ids and similarities are
    those of one index; the brand filter too (one selector over the gallery's ids)."""
    x, one, sharded = _two_ways(kind, _whitening(d=D) if whiten else None)
    assert isinstance(sharded.index, faiss.IndexShards) == (kind == "flat")
    assert sharded.index.ntotal == len(sharded) == 4000
    if kind != "flat":                                   # no shard was trained again: one set of centroids
        cents = [faiss.extract_index_ivf(s.index).quantizer.reconstruct_n(0, 8) for s in sharded.shards.values()]
        assert all(np.array_equal(c, cents[0]) for c in cents)
    q = _clustered(40, seed=7, d=D)
    for nprobe in (1, 8):
        a, b = one.search(q, 10, nprobe=nprobe), sharded.search(q, 10, nprobe=nprobe)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)     # pq: one dot product over another candidate order
    if kind == "flat":
        truth, sims = _exact(x, q, _whitening(d=D) if whiten else None)
        np.testing.assert_array_equal(sharded.search(q, 10)[1], truth)
    where = lambda rows: rows[BRAND] == "C"  # noqa: E731
    for ra, rb in zip(one.results(q, 10, where), sharded.results(q, 10, where)):
        assert set(rb[BRAND]) == {"C"} and rb["listing_id"].tolist() == ra["listing_id"].tolist()
    picked = np.array([3, 2600, 3999])                    # one from each shard holding vectors
    np.testing.assert_allclose(sharded.vectors(picked), one.vectors(picked), atol=1e-6)
    deep = [g.results(q[:1], 4000)[0]["listing_id"].tolist() for g in (one, sharded)]   # k beyond every shard
    assert deep[0] == deep[1] and len(set(deep[1])) == (4000 if kind == "flat" else len(deep[1]))


def test_a_day_is_added_dropped_and_merged_on_disk_without_touching_the_base(tmp_path):
    """add to a new shard writes that shard and gallery.json only (the base's files byte-identical);
    drop forgets a shard whole (no index read); merge compacts two days into a week that answers as
    they did; ids stay unique and are never reused."""
    (tmp_path / "config.json").write_text('{"fingerprint": "f"}')
    x = _clustered(4000, d=D)
    g = Gallery.build(x[:2500], _rows(2500), "ivf", fingerprint="f")
    g.save(tmp_path)
    folder = tmp_path / "gallery"
    base = {f: (folder / f).read_bytes() for f in ("index.faiss", "listings.csv")}
    for day, (a, b) in {"d1": (2500, 3000), "d2": (3000, 3500), "d3": (3500, 4000)}.items():
        part = Gallery.load(tmp_path, only=[day])
        assert [n for n, s in part.shards.items() if s.index is not None] == []     # nothing read
        part.add(x[a:b], _rows(b - a, a), day)
        part.save(tmp_path, only=[day])
    assert {f: (folder / f).read_bytes() for f in base} == base
    assert shard_counts(tmp_path) == {"base": 2500, "d1": 500, "d2": 500, "d3": 500}
    q = _clustered(30, seed=7, d=D)
    whole = Gallery.load(tmp_path)
    before = whole.search(q, 10)
    n, g = indexing.merge(tmp_path, ["d1", "d2"], "week")
    assert n == 1000 and list(g.shards) == ["base", "d3", "week"]
    assert not (folder / "shards" / "d1").exists() and (folder / "shards" / "week" / "index.faiss").is_file()
    after = Gallery.load(tmp_path).search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    n, g = indexing.drop(tmp_path, "d3")
    assert n == 500 and not (folder / "shards" / "d3").exists()
    left = Gallery.load(tmp_path)
    assert len(left) == 3500 and left.search(q, 10)[1].max() < 3500        # d3's ids (3500..) gone
    left.add(x[:10] * -1, _rows(10, 9000), "d4")
    assert left.shards["d4"].listings[ID].min() == 4000               # after d3's, not reusing them


def test_a_gallery_written_by_the_code_of_one_index_reads_as_one_shard(tmp_path):
    """The files hier wrote before shards (index.faiss with no hash table, listings.csv, gallery.json
    of kind/fingerprint/labels, no empty.faiss): read as the base shard, searched as before; the first
    day added derives the trained empty index from it once and leaves its files as they were."""
    (tmp_path / "config.json").write_text('{"fingerprint": "f"}')
    x = _clustered(3000, d=D)
    ivf = faiss.index_factory(D, factory_string("ivf", 2500, D), faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[:2500])
    ivf.add_with_ids(x[:2500], np.arange(2500))
    folder = tmp_path / "gallery"
    folder.mkdir()
    faiss.write_index(ivf, str(folder / "index.faiss"))
    _rows(2500).assign(hier_id=np.arange(2500)).to_csv(folder / "listings.csv", index=False)
    (folder / "gallery.json").write_text(json.dumps({"kind": "ivf", "fingerprint": "f", "labels": None}))
    old = _files(folder)
    g = Gallery.load(tmp_path)
    assert list(g.shards) == ["base"] and g.next_id == 2500 and g.template is None
    q = _clustered(20, seed=7, d=D)
    params = faiss.SearchParametersIVF()
    params.nprobe = 16
    np.testing.assert_array_equal(g.search(q, 10)[1], ivf.search(q, 10, params=params)[1])
    part = Gallery.load(tmp_path, only=["today"])
    part.add(x[2500:], _rows(500, 2500), "today")
    part.save(tmp_path, only=["today"])
    assert {f: b for f, b in _files(folder).items() if f in old and f != "gallery.json"} == \
        {f: b for f, b in old.items() if f != "gallery.json"}
    assert (folder / "empty.faiss").is_file() and faiss.read_index(str(folder / "empty.faiss")).ntotal == 0
    both = Gallery.load(tmp_path)
    ivf.add_with_ids(x[2500:], np.arange(2500, 3000))
    np.testing.assert_array_equal(both.search(q, 10)[1], ivf.search(q, 10, params=params)[1])


def test_bad_shard_operations_are_one_line_and_change_nothing(tmp_path):
    (tmp_path / "config.json").write_text('{"fingerprint": "f"}')
    x = _clustered(3500, d=D)
    g = Gallery.build(x[:2500], _rows(2500), "ivf", fingerprint="f")
    g.add(x[2500:3000], _rows(500, 2500), "d1")
    g.save(tmp_path)
    folder = tmp_path / "gallery"
    before = _files(folder)
    with pytest.raises(HierError, match="no shard 'nope' .its shards: base, d1."):
        indexing.drop(tmp_path, "nope")
    with pytest.raises(HierError, match="no shard 'nope'"):
        indexing.merge(tmp_path, ["d1", "nope"], "week")
    with pytest.raises(HierError, match="nothing to merge into 'd1'"):
        indexing.merge(tmp_path, ["d1"], "d1")
    part = Gallery.load(tmp_path, only=["d1"])
    with pytest.raises(HierError, match="'L2600' is already in the index"):
        part.add(x[:1], _rows(1, 2600), "d1")
    with pytest.raises(HierError, match="shard name '../x'"):
        shard_name("../x")
    # a shard trained apart (another quantizer) and one of another kind, placed by hand
    apart = Gallery.build(x[3000:], _rows(500, 3000), "ivf", fingerprint="f")
    flat = Gallery.build(x[3000:], _rows(500, 3000), "flat", fingerprint="f")
    for name, other in (("apart", apart), ("flatday", flat)):
        shard = folder / "shards" / name
        shard.mkdir(parents=True)
        (shard / "index.faiss").write_bytes(other._index_bytes())
        other.listings.to_csv(shard / "listings.csv", index=False)
    meta = json.loads((folder / "gallery.json").read_text())
    meta["shards"] |= {"apart": 500, "flatday": 500}
    (folder / "gallery.json").write_text(json.dumps(meta))
    before = _files(folder)
    with pytest.raises(HierError, match="cannot be merged into .d1. .not trained as one: "):
        indexing.merge(tmp_path, ["apart"], "d1")
    with pytest.raises(HierError, match="shard 'flatday' is flat index, the gallery ivf"):
        indexing.merge(tmp_path, ["flatday"], "d1")
    assert _files(folder) == before


def test_a_writer_that_fails_leaves_the_previous_gallery_whole(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"fingerprint": "f"}')
    x = _clustered(3000, d=D)
    g = Gallery.build(x[:2500], _rows(2500), "flat", fingerprint="f")
    g.add(x[2500:2800], _rows(300, 2500), "d1")
    g.save(tmp_path)
    folder = tmp_path / "gallery"
    before = _files(folder)
    real = fileio.write_json

    def full_disk(path, obj):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fileio, "write_json", full_disk)        # gallery.json, written last of each set
    part = Gallery.load(tmp_path, only=["d2"])
    part.add(x[2800:], _rows(200, 2800), "d2")
    for write in (lambda: part.save(tmp_path, only=["d2"]), lambda: indexing.drop(tmp_path, "d1"),
                  lambda: indexing.merge(tmp_path, ["d1"], "base")):
        with pytest.raises(HierError, match="no space left on device"):
            write()
        assert _files(folder) == before
    monkeypatch.setattr(fileio, "write_json", real)
    assert shard_counts(tmp_path) == {"base": 2500, "d1": 300}
    assert len(Gallery.load(tmp_path)) == 2800


def test_daily_shards_through_the_cli_and_a_served_gallery_sees_them(art, demo_data, tmp_path, capsys):
    """build, add --shard (a clash with another shard refused before embedding), similar finds a
    listing of a day's shard, the Recognizer holding the gallery reads it again after add / merge /
    drop, remove reaches into a shard, rebuild keeps the shards."""
    assert run_cli("index", "build", art, _listings(demo_data, tmp_path, "base", n=8), capsys=capsys)[0] == 0
    rec = Recognizer(art)
    assert len(rec.gallery()) == 8
    day = _listings(demo_data, tmp_path, "day", n=4, start=40)
    code, out, _ = run_cli("index", "add", art, day, "--shard", "2025-03-07", capsys=capsys)
    assert code == 0 and "added 4 to shard 2025-03-07 (4); 12 in the index" in out, out
    assert len(rec.gallery()) == 12 and set(rec.gallery().shards) == {"base", "2025-03-07"}
    photo = sorted(day.iterdir())[2]
    assert rec.similar(photo, k=1)["listing_id"][0] == "day_2"
    before = _files(art / "gallery")
    csv = tmp_path / "again.csv"
    pd.DataFrame({"listing_id": ["fresh", "day_1"], "image": [photo, photo]}).to_csv(csv, index=False)
    code, _, err = run_cli("index", "add", art, csv, "--shard", "2025-03-08", capsys=capsys)
    assert _one_line_error(code, err) and "'day_1' is already in the index" in err, err
    for args, message in ((("drop", art, "2025-01-01"), "no shard '2025-01-01'"),
                          (("merge", art, "2025-03-07", "x", "--into", "week"), "no shard 'x'"),
                          (("add", art, day, "--shard", "a/b"), "shard name 'a/b'")):
        code, _, err = run_cli("index", *args, capsys=capsys)
        assert _one_line_error(code, err) and message in err, err
    assert _files(art / "gallery") == before
    code, out, _ = run_cli("index", "shards", art, "--format", "json", capsys=capsys)
    assert json.loads(out) == [{"shard": "base", "listings": 8}, {"shard": "2025-03-07", "listings": 4}]
    assert run_cli("index", "remove", art, "day_0", capsys=capsys)[0] == 0
    assert shard_counts(art) == {"base": 8, "2025-03-07": 3}
    assert run_cli("index", "rebuild", art, capsys=capsys)[0] == 0
    assert shard_counts(art) == {"base": 8, "2025-03-07": 3}
    assert run_cli("index", "merge", art, "2025-03-07", "--into", "2025-w10", capsys=capsys)[0] == 0
    assert set(rec.gallery().shards) == {"base", "2025-w10"} and rec.similar(photo, k=1)["listing_id"][0] == "day_2"
    code, out, _ = run_cli("index", "drop", art, "2025-w10", capsys=capsys)
    assert code == 0 and "dropped shard 2025-w10 (3 listing image(s)); 8 in the index" in out
    assert len(rec.gallery()) == 8 and "day_2" not in set(rec.similar(photo, k=8)["listing_id"])
    assert artifact.read_config(art)["fingerprint"] == json.loads((art / "gallery" / "gallery.json").read_text())[
        "fingerprint"]


def test_loading_a_pq_gallery_reads_its_vectors_ahead_in_the_background(tmp_path, monkeypatch):
    """Each read shard's vectors.npy is handed to ``prefetch`` (a cold page cache costs a disk read per
    re-ranked row: README), shards not read are not; the read-ahead itself survives a file gone."""
    (tmp_path / "config.json").write_text('{"fingerprint": "f"}')
    x = _clustered(3000, d=D)
    g = Gallery.build(x[:2500], _rows(2500), "pq", _whitening(d=D), fingerprint="f")
    g.add(x[2500:], _rows(500, 2500), "d1")
    g.save(tmp_path)
    asked = []
    monkeypatch.setattr(store, "prefetch", asked.append)
    Gallery.load(tmp_path)
    folder = tmp_path / "gallery"
    assert asked == [folder / VECTORS, folder / "shards" / "d1" / VECTORS]
    asked.clear()
    Gallery.load(tmp_path, only=["d1"])
    assert asked == [folder / "shards" / "d1" / VECTORS]
    _read_ahead(tmp_path / "gone.npy")          # no exception: nothing to warm


def test_pq_re_ranks_by_its_vectors_through_shards_merges_removes_and_saves(tmp_path):
    """pq finds k x RERANK candidates by its codes and re-ranks them by the listings' float16 vectors
    (vectors.npy beside each shard's index): Recall@10 against exact search measured (seeded, 40
    queries) 0.97 re-ranked, 0.66 by the codes alone; the similarities are the exact ones of the returned
    listings; the vectors follow their listings through a merge, a remove, a save and a load; a shard
    whose vectors file is not its own (gallery.json records the digest of its rows' ids: a cut save,
    another writer's rows, not floats) or is missing is searched by its codes alone, warned."""
    (tmp_path / "config.json").write_text('{"fingerprint": "f"}')
    w = _whitening(d=D)
    x, q = _clustered(4000, d=D), _clustered(40, seed=7, d=D)
    g = Gallery.build(x[:3000], _rows(3000), "pq", w, fingerprint="f")
    g.add(x[3000:3500], _rows(500, 3000), "d1")
    g.add(x[3500:], _rows(500, 3500), "d2")
    assert g.merge(["d1", "d2"], "week") == 1000
    assert g.remove([f"L{i}" for i in range(0, 4000, 3)]) == 1334
    g.save(tmp_path)
    folder = tmp_path / "gallery"
    assert np.load(folder / VECTORS).shape == (2000, D) and np.load(folder / VECTORS).dtype == np.float16
    assert np.load(folder / "shards" / "week" / VECTORS).shape == (666, D)
    loaded = Gallery.load(tmp_path)
    kept = np.arange(4000) % 3 != 0
    truth, _ = _exact(x, q, w, allowed=kept)
    sims, ids = loaded.search(q, 10)
    assert _recall(ids, truth) >= 0.95 and kept[ids].all()
    np.testing.assert_allclose(sims, np.einsum("qkd,qd->qk", loaded.searched(x)[ids], loaded.searched(q)), atol=3e-3)
    rows = loaded.results(q[:3], 5, where=lambda r: r[BRAND] == "B")
    assert all(set(r[BRAND]) == {"B"} and len(r) == 5 for r in rows)
    codes_alone = _recall(Gallery.load(tmp_path, only=["base", "week"])._search(q, 10, None, None, None)[1], truth)
    assert codes_alone < 0.8
    week = folder / "shards" / "week" / VECTORS
    good = np.load(week)
    meta = json.loads((folder / "gallery.json").read_text())
    older = {k: v for k, v in meta.items() if k != "vectors"}
    for bad, written in ((np.zeros((3, D), np.float16), meta),      # a cut save
                         (good, older),           # an older hier's writer changed the listings, not the file
                         (good.astype(np.int8), meta)):             # not vectors
        np.save(week, bad)
        (folder / "gallery.json").write_text(json.dumps(written))
        with pytest.warns(HierWarning, match=r"week/vectors.npy was not written with its listings: .* codes alone"):
            cut = Gallery.load(tmp_path)
        assert cut.shards["week"].exact is None and not cut._reranks()
        assert _recall(cut.search(q, 10)[1], truth) == codes_alone
    for poison in (np.nan, np.inf):             # the right rows and digest, a value no similarity can order
        spoilt = good.copy()
        spoilt[5, 0] = poison
        np.save(week, spoilt)
        (folder / "gallery.json").write_text(json.dumps(meta))
        with pytest.raises(HierError, match="vectors.npy holds a vector that is not finite"):
            Gallery.load(tmp_path).search(q, 10)
    np.save(week, good.astype(np.int8))
    cut.save(tmp_path)                           # saved without vectors: the stale file is removed
    assert not week.exists() and "week" not in json.loads((folder / "gallery.json").read_text())["vectors"]
    with pytest.warns(HierWarning, match=r"week/vectors.npy is missing"):
        Gallery.load(tmp_path)
    week.write_bytes(b"")                        # an empty file: one line, not numpy's EOFError
    with pytest.raises(HierError, match="is damaged"):
        Gallery.load(tmp_path)
    with pytest.raises(HierError, match="rerank must be"):
        loaded.search(q, 10, rerank=2.5)
    with pytest.raises(RuntimeError, match="not in the gallery"):
        loaded.vectors(np.array([0]))            # removed
