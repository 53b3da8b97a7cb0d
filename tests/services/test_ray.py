"""The Ray Data pipeline of docs/commands/embed.md, run as the page shows it on a local Ray instance."""
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, STANFORD, run_cli

from hier.errors import HierError
from hier.gallery import Gallery
from hier.recognizer import Recognizer
from hier.services import embedding

DOC = ROOT / "docs" / "commands" / "embed.md"
CLASSES, PER_CLASS, K = 4, 10, 10
TOLERANCE = 1e-5          # one float32 network on the same photos: equal but for the summation order of a batch


def ray_snippet() -> str:
    """The one ```python block of docs/commands/embed.md that imports ray."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
              if re.search(r"^import ray$", b, re.MULTILINE)]
    assert len(blocks) == 1, f"{DOC} has {len(blocks)} Ray Data blocks, not one"
    return blocks[0]


def with_local_places(code: str, places: dict[str, str]) -> str:
    """The snippet with its bucket, artifact and pool size replaced (each must still be there)."""
    for old, new in places.items():
        assert old in code, f"the Ray block of {DOC.name} no longer says {old!r}; update test_ray.py's places"
        code = code.replace(old, new)
    return code


def same_neighbours(a: pd.DataFrame, b: pd.DataFrame) -> int:
    """Asserts that two searches' results name the same listings at every rank, with similarities within
    TOLERANCE, but for two listings whose similarities are within TOLERANCE of each other (a rounding may
    order them either way: the tiny net of drawn cars puts real photos close together, some neighbours'
    similarities a few 1e-6 apart). Returns the ranks that name the very same listing."""
    ids_a, ids_b = list(a["listing_id"]), list(b["listing_id"])
    sim_a, sim_b = (r["hier_similarity"].to_numpy(float) for r in (a, b))
    assert len(ids_a) == len(ids_b) and np.abs(sim_a - sim_b).max() < TOLERANCE
    for rank, other in enumerate(ids_b):
        where = ids_a.index(other) if other in ids_a else len(ids_a) - 1     # past a's last: tied with it
        assert abs(sim_a[where] - sim_a[rank]) < TOLERANCE, (rank, ids_a, ids_b)
    return sum(x == y for x, y in zip(ids_a, ids_b))


@pytest.fixture
def listings(tmp_path):
    """Real photos (the first PER_CLASS of each of the first CLASSES Stanford classes) as a listings CSV
    whose ids and zips are digits with leading zeros, prices numbers (one blank), notes "n/a" and "1e5": the
    cells a CSV reader retypes (the page's first snippet read zip 01234 as 1234 and n/a as missing)."""
    if not STANFORD.is_dir():
        pytest.skip(f"no Stanford Cars photos at {STANFORD}")
    classes = sorted(p.name for p in STANFORD.iterdir() if p.is_dir())[:CLASSES]
    photos = [p for c in classes for p in sorted((STANFORD / c).glob("*.jpg"))[:PER_CLASS]]
    path = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": [f"{i:05d}" for i in range(len(photos))], "image": [str(p) for p in photos],
                  "price": [str(9000 + 250 * i) if i else "" for i in range(len(photos))],
                  "zip": [f"0{1000 + i}" for i in range(len(photos))],
                  "note": ["n/a" if i % 2 else "1e5" for i in range(len(photos))]}).to_csv(path, index=False,
                                                                                           encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_documented_ray_pipeline_builds_the_gallery_hier_embed_builds(tiny_artifact, listings, tmp_path,
                                                                           capsys):
    """The ```python block of docs/commands/embed.md that imports ray, executed as written with local
    paths for the bucket and the artifact and an actor pool of at most 2 (``ray.init(num_cpus=2)``), over
    40 real photos of 4 classes; beside it, ``hier embed`` and ``hier index build --from-embeddings
    --index ivf`` in a copy of the same artifact. Checked: the pipeline's Parquet holds the 40 listing ids
    as given (``00000``..``00039``, leading zeros kept) and their prices as ``hier embed`` keeps them; every
    embedding equals ``hier embed``'s within 1e-5 (max absolute difference; the same float32 network on
    the same photos, which Ray may cut into other batches) and BatchEmbedder's hier_class/brand/model are
    ``hier embed``'s; the two saved galleries hold the same listings with the same answers, weights
    fingerprint and labels digest; each of the 40 vectors as a query finds the same 10 neighbours in the
    same order in both (similarities within 1e-5; two neighbours tied within 1e-5 may trade places:
    ``same_neighbours``), and so does ``Recognizer.similar`` (k=5) on one photo of each class.

    The defect this guards: the page showed a snippet no test ran (``concurrency=16``, a fixed actor
    pool; on 2 CPUs a fixed pool of 2 left no CPU to read the CSV, and the job made no progress in minutes), and said Ray's output
    was "passed to ``Gallery.build``", which needs the search whitening and the answers digest from
    hier's internals; ``gallery_of_table`` is that line now."""
    ray = pytest.importorskip("ray", reason='Ray Data is the "scale" extra: pip install "hier[scale]"')
    cli_art = shutil.copytree(tiny_artifact[0], tmp_path / "cli")
    ray_art = shutil.copytree(tiny_artifact[0], tmp_path / "ray")
    ray_out = tmp_path / "emb_ray"
    code = with_local_places(ray_snippet(), {"s3://bucket/listings.csv": str(listings),
                                             "s3://bucket/emb/": str(ray_out), "runs/base": str(ray_art),
                                             "max_size=16": "max_size=2"})
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2 ** 20, log_to_driver=False,
             logging_level="warning")
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "embed_md"})  # noqa: S102 (the docs page's own code)
    finally:
        ray.shutdown()

    cli_out = tmp_path / "emb_cli"
    assert run_cli("embed", cli_art, listings, "--out", cli_out, capsys=capsys)[0] == 0
    code, out, _ = run_cli("index", "build", cli_art, "--from-embeddings", cli_out, "--index", "ivf", capsys=capsys)
    assert code == 0 and "indexed 40" in out

    ids = [f"{i:05d}" for i in range(CLASSES * PER_CLASS)]
    ray_vectors, ray_rows = embedding.table_embeddings(pq.read_table(ray_out))
    cli_vectors, cli_rows = embedding.read_embeddings(cli_out)
    assert sorted(ray_rows["listing_id"]) == sorted(cli_rows["listing_id"]) == ids
    order = pd.Series(range(len(ray_rows)), index=ray_rows["listing_id"])[cli_rows["listing_id"]].to_numpy()
    ray_vectors, ray_rows = ray_vectors[order], ray_rows.iloc[order].reset_index(drop=True)
    difference = float(np.abs(ray_vectors - cli_vectors).max())
    assert difference < TOLERANCE
    pd.testing.assert_frame_equal(ray_rows[list(cli_rows.columns)], cli_rows)   # ids, photos, prices, answers
    assert cli_rows["hier_class"].nunique() > 1                                # answers that could differ

    ray_gallery, cli_gallery = Gallery.load(ray_art), Gallery.load(cli_art)
    assert (ray_gallery.kind, ray_gallery.fingerprint, ray_gallery.labels_digest) \
        == (cli_gallery.kind, cli_gallery.fingerprint, cli_gallery.labels_digest)
    assert cli_gallery.kind == "ivf" and cli_gallery.fingerprint == Recognizer(cli_art).net.fingerprint() \
        and cli_gallery.labels_digest is not None
    columns = ["listing_id", "image", "price", "zip", "note", "hier_class", "hier_brand", "hier_model"]
    listed = [g.listings[columns].sort_values("listing_id", ignore_index=True) for g in (ray_gallery, cli_gallery)]
    pd.testing.assert_frame_equal(*listed)

    found = [g.results(cli_vectors, k=K) for g in (ray_gallery, cli_gallery)]
    assert [len(r) for r in found[0]] == [K] * len(ids)
    alike = sum(same_neighbours(a, b) for a, b in zip(*found))
    queries = list(cli_rows["image"].iloc[::PER_CLASS])          # one photo of each class
    similar = [[Recognizer(art).similar(q, k=5) for q in queries] for art in (ray_art, cli_art)]
    assert [len(r) for r in similar[0]] == [5] * CLASSES
    alike_similar = sum(same_neighbours(a, b) for a, b in zip(*similar))
    print(f"max |ray - hier embed| {difference:.2e} over {len(ids)} listings; the very same listing at "
          f"{alike}/{len(ids) * K} ranks of {len(ids)} searches and {alike_similar}/{CLASSES * 5} of similar()")


def test_a_table_another_job_wrote_gives_its_vectors_or_one_line_why_not():
    """``table_embeddings`` (what ``gallery_of_table`` reads): a list, a fixed-size list or a large list
    column give the same (2, 3) float32 vectors and the listings as text; refused in one HierError each:
    no listing_id, no hier_embedding, vectors of two sizes, vectors of another size than the artifact's, a
    missing vector, a listing twice (an emb/ folder Ray wrote twice: its write_parquet adds files beside
    the first run's), a column a reader typed (an int id: ``00017`` read as 17), a NaN in a vector (the
    gallery took it and no search ever found the listing) and a row without a listing_id."""
    vectors = np.array([[1, 0, 0], [0, 0.6, 0.8]], np.float32)
    flat = pa.array(vectors.ravel())
    columns = {"listing_id": pa.array(["7", "8"]), "image": pa.array(["a.jpg", "b.jpg"])}
    for column in (pa.array(vectors.tolist(), pa.list_(pa.float32())),
                   pa.FixedSizeListArray.from_arrays(flat, 3), pa.array(vectors.tolist(), pa.large_list(pa.float32()))):
        got, rows = embedding.table_embeddings(pa.table({**columns, "hier_embedding": column}), dim=3)
        assert got.dtype == np.float32 and np.array_equal(got, vectors)
        assert list(rows["listing_id"]) == ["7", "8"] and list(rows.columns) == ["listing_id", "image"]
    good = pa.table({**columns, "hier_embedding": pa.FixedSizeListArray.from_arrays(flat, 3)})
    refused = {"no 'listing_id' column": good.drop_columns(["listing_id"]),
               "no 'hier_embedding' column": good.drop_columns(["hier_embedding"]),
               "vectors of 2 and 3 numbers": good.set_column(2, "hier_embedding", pa.array([[1.0, 0.0], [0.0, 0.6, 0.8]])),
               "with missing rows": good.set_column(2, "hier_embedding", pa.array([[1.0, 0.0, 0.0], None])),
               "listing_id '7' is in two rows": pa.concat_tables([good, good.slice(0, 1)]),
               # a reader that typed the cells changed them; a row no search can find; a listing no one can name
               "column 'listing_id' of the embeddings table is int64, not text": good.set_column(
                   0, "listing_id", pa.array([7, 8])),
               "listing '8' of the embeddings table has a vector with a missing, NaN or infinite number": good.set_column(
                   2, "hier_embedding", pa.array([[1.0, 0.0, 0.0], [0.0, float("nan"), 0.8]])),
               "has no listing_id": good.set_column(0, "listing_id", pa.array(["7", None]))}
    for message, table in refused.items():
        with pytest.raises(HierError, match=re.escape(message)):
            embedding.table_embeddings(table, dim=3)
    with pytest.raises(HierError, match="vectors of 3 numbers, where the artifact embeds 32"):
        embedding.table_embeddings(good, dim=32)
