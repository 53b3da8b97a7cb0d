"""Bulk embedding (``hier embed``): listing photos in, Parquet shards of embeddings out, a gallery built
from them later.

``hier embed ARTIFACT LISTINGS --out EMB/ --shard i/N`` embeds every N-th listing (N machines, one shard
each) and streams the rows to ``EMB/part-iiiii-of-NNNNN.parquet`` one row group at a time: memory stays
flat however many photos there are. Each row is a listing as given (its columns kept, as text) plus
``hier_embedding`` (float32) and the answer (``hier_class``, ``hier_brand``, ``hier_model``); the file
records the fingerprint of the weights that embedded it, and ``hier index build ARTIFACT
--from-embeddings EMB/`` refuses shards of other weights, missing shards or repeated listings.

``BatchEmbedder`` is the function every shard maps over its rows (a pandas batch in, the same rows with
their embedding out): a Ray Data ``map_batches`` or a Spark ``mapInPandas`` job maps the same, and
``gallery_of_table`` builds the gallery of what such a job wrote (docs/commands/embed.md;
tests/services/test_ray.py runs the Ray Data pipeline).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hier import artifact, fileio
from hier.data import first_repeat
from hier.errors import HierError
from hier.export import artifact_predictor
from hier.gallery.gallery import Gallery
from hier.gallery.kinds import factory_string
from hier.gallery.listings import PREFIX, answer_columns, label_columns
from hier.gallery.results import LABEL_CHUNK
from hier.outputs import is_inside
from hier.runtime import device
from hier.services.labelling import answers_digest, search_whitening

EMBEDDING = "hier_embedding"
CHUNK = 2048                    # rows embedded and written per row group
META = b"hier"                  # Parquet key-value metadata: {"fingerprint", "listings", "of", "shard"}
PART = re.compile(r"part-(\d{5})-of-(\d{5})\.parquet")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (0 <= i < N) -> (i, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m[1]) < int(m[2]) <= 99_999:
        raise HierError(f"--shard {text!r}: give i/N with 0 <= i < N, e.g. 0/4 for the first of four")
    return int(m[1]), int(m[2])


def part_name(shard: int, shards: int) -> str:
    return f"part-{shard:05d}-of-{shards:05d}.parquet"


class BatchEmbedder:
    """``BatchEmbedder(ARTIFACT)(rows)``: listings (``listing_id``, ``image``, ...) -> the same rows with
    ``hier_embedding`` and the answer. The artifact is read once (under its lock), in the process that
    constructs it (a Ray Data actor gets the path, ``fn_constructor_args``, never a pickled network);
    ``fingerprint`` names the weights.

    Args:
        artifact_dir: the folder ``hier train`` wrote.
        backend: ``auto``, ``torch`` or ``onnx`` (as ``hier embed --backend``).
        batch_size: photos per forward pass.
        workers: photo decoding processes beside the network.

    Returns:
        Called on a pandas DataFrame with an ``image`` column (a path of a photo file this process can
        open; every other column is kept as it is), the same rows in the same order plus
        ``hier_embedding`` (one float32 vector of the artifact's embedding size a row) and
        ``hier_class``, ``hier_brand``, ``hier_model``.

    Raises:
        HierError: ``artifact_dir`` is not an artifact (on construction). A photo that is missing or does
            not decode raises its reader's error (``OSError``, ``PIL.UnidentifiedImageError``): ``hier
            embed`` checks its listings first (``hier.gallery.read_listings``); another job should too.

    Example:
        >>> rows = BatchEmbedder("runs/base")(pd.DataFrame({"listing_id": ["L1"], "image": ["car.jpg"]}))
        >>> list(rows.columns)
        ['listing_id', 'image', 'hier_class', 'hier_brand', 'hier_model', 'hier_embedding']
    """

    def __init__(self, artifact_dir: str | Path, backend: str = "auto", batch_size: int = 64,
                 workers: int | None = None):
        artifact_dir = Path(artifact_dir)
        with fileio.locked(artifact_dir):
            _, net, self.taxonomy = artifact.snapshot(artifact_dir, device())
            self.predictor = artifact_predictor(artifact_dir, net, backend, batch_size=batch_size, workers=workers)
        self.fingerprint = net.fingerprint()

    def __call__(self, rows: pd.DataFrame, progress=None, task=None) -> pd.DataFrame:
        out = {"embedding": [], "answer": []}
        for batch in self.predictor.batches([Path(p) for p in rows["image"]]):
            for k in out:
                out[k].append(batch[k])
            if progress is not None:
                progress.advance(task, len(batch["answer"]))
        if not len(rows):
            return rows.assign(**{EMBEDDING: []}, **answer_columns(np.zeros(0, int), self.taxonomy))
        vectors = np.concatenate(out["embedding"])
        return rows.assign(**answer_columns(np.concatenate(out["answer"]), self.taxonomy),
                           **{EMBEDDING: list(vectors)})


def _as_text(rows: pd.DataFrame) -> pd.DataFrame:
    """The listings' own columns as text (a Parquet column has one type; sellers' cells mix them)."""
    return rows.assign(**{c: rows[c].astype("string") for c in rows.columns if c != EMBEDDING})


def _arrow(rows: pd.DataFrame, dim: int) -> pa.Table:
    table = pa.Table.from_pandas(_as_text(rows.drop(columns=[EMBEDDING])), preserve_index=False)
    flat = np.concatenate(rows[EMBEDDING].to_numpy()).astype(np.float32) if len(rows) else np.zeros(0, np.float32)
    return table.append_column(EMBEDDING, pa.FixedSizeListArray.from_arrays(pa.array(flat), dim))


def embed(artifact_dir: str | Path, listings: pd.DataFrame, out: str | Path, shard: tuple[int, int] = (0, 1),
          backend: str = "auto", batch_size: int = 64, workers: int | None = None, progress=None) -> Path:
    """Embed shard ``i`` of ``N`` of ``listings`` (``hier.gallery.read_listings``' table: every N-th row
    from row i) into ``out/part-i-of-N.parquet``, written atomically; an existing part is refused."""
    i, n = shard
    if Path(out).exists() and not Path(out).is_dir():
        raise HierError(f"--out {out} is a file; give the folder of the shards")
    if is_inside(out, artifact_dir):
        raise HierError(f"--out {out} is inside the artifact {artifact_dir}; write the shards elsewhere")
    dst = Path(out) / part_name(i, n)
    if dst.exists():
        raise HierError(f"{dst} exists; delete it to embed shard {i}/{n} again")
    rows = listings.iloc[i::n].reset_index(drop=True)
    embedder = BatchEmbedder(artifact_dir, backend, batch_size, workers)
    dim = embedder.predictor.net.cfg.embed_dim
    launch = {"fingerprint": embedder.fingerprint, "listings": listings_digest(listings), "of": n}
    meta = {META: json.dumps({**launch, "shard": i}).encode()}
    task = progress.add_task(f"embed {i}/{n}", total=len(rows), info="") if progress is not None else None

    def write(path: Path) -> None:
        writer = None
        try:
            for s in range(0, max(1, len(rows)), CHUNK):       # an empty shard is a file of no rows
                table = _arrow(embedder(rows.iloc[s:s + CHUNK], progress, task), dim)
                writer = writer or pq.ParquetWriter(path, table.schema.with_metadata(meta))
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    if not fileio.atomic_create(dst, write):      # two launches of one shard: the first one to finish lands
        raise HierError(f"{dst} was written by another `hier embed` meanwhile; nothing of this run was kept")
    return dst


def listings_digest(listings: pd.DataFrame) -> str:
    """What identifies the listings a launch embeds (every shard of it reads the same table): the MD5 of
    their ids, in order (not their photos' paths, which differ between machines that mount the data
    elsewhere). Shards of launches over other listings never mix in one gallery."""
    text = json.dumps(listings["listing_id"].astype(str).tolist(), ensure_ascii=False)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def read_embeddings(folder: str | Path, fingerprint: str | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Every shard of ``folder`` -> (embeddings (n, D) float32, listings with the answer columns). All N
    parts of one launch must be there, of the weights ``fingerprint`` (when given), with no listing twice."""
    folder = Path(folder)
    parts = sorted(p for p in folder.glob("part-*-of-*.parquet") if PART.fullmatch(p.name)) if folder.is_dir() else []
    if not parts:
        raise HierError(f"no embedding shards (part-*-of-*.parquet from `hier embed`) in {folder}")
    counts = {int(PART.fullmatch(p.name)[2]) for p in parts}
    if len(counts) > 1:
        raise HierError(f"{folder} mixes shards of launches into {sorted(counts)} parts; keep one launch's")
    (n,) = counts
    missing = sorted(set(range(n)) - {int(PART.fullmatch(p.name)[1]) for p in parts})
    if missing:
        raise HierError(f"{folder}: shard {missing[0]}/{n} is missing ({len(missing)} of {n}); run "
                        f"`hier embed ... --shard {missing[0]}/{n}`")
    vectors, tables, launches = [], [], {}
    for p in parts:
        try:
            table = pq.read_table(p)
            meta = json.loads((table.schema.metadata or {})[META])
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
            raise HierError(f"{p} is not a `hier embed` shard ({str(e).splitlines()[0][:100] or 'no hier metadata'})") \
                from None
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise HierError(f"{p} was embedded by other weights than the artifact's (fingerprint "
                            f"{meta.get('fingerprint')!r}); embed again with `hier embed`")
        launches.setdefault(meta.get("listings"), p)
        if len(launches) > 1:
            first = next(iter(launches.values()))
            raise HierError(f"{folder} mixes shards of launches over different listings ({first.name} and {p.name}): "
                            "a listing added between launches would be lost; embed every shard again from one "
                            "listings file")
        column = table.column(EMBEDDING).combine_chunks()
        vectors.append(column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size))
        tables.append(table.drop_columns([EMBEDDING]).to_pandas())
    rows = pd.concat(tables, ignore_index=True)
    rows = rows.astype(object).where(rows.notna(), np.nan)      # missing cells as read_listings gives them
    repeat = first_repeat(rows["listing_id"])
    if repeat:
        raise HierError(f"{folder}: listing_id {repeat[0]!r} is in two rows of the shards; embed each listing once")
    return np.concatenate(vectors).astype(np.float32), rows


def table_embeddings(table: pa.Table, dim: int | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """A table of ``BatchEmbedder``'s rows as another job wrote them (Ray Data's ``write_parquet``, Spark)
    -> (embeddings (n, D) float32, listings with their own columns as text, as ``read_embeddings``
    gives them). ``hier_embedding`` may be a list, a fixed-size list or Ray's tensor column; every
    vector must have ``dim`` numbers (when given), all finite; every other column must be text (a reader
    that typed the cells has changed them), every listing_id given, none twice. Else HierError."""
    missing = [c for c in ("listing_id", EMBEDDING) if c not in table.column_names]
    if missing:
        raise HierError(f"the embeddings table has no {missing[0]!r} column (columns: "
                        f"{', '.join(table.column_names)[:200]}); give the rows BatchEmbedder returned")
    typed = [f for f in table.schema if f.name != EMBEDDING
             and not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_null(f.type))]
    if typed:       # a reader that typed the cells has changed them already ("01234" -> 1234, "n/a" -> missing)
        raise HierError(f"column {typed[0].name!r} of the embeddings table is {typed[0].type}, not text: read every "
                        "column of the listings as text, as written (docs/commands/embed.md shows how), or its cells "
                        "may no longer be what the sellers wrote")
    if table.column("listing_id").null_count:
        raise HierError("a row of the embeddings table has no listing_id; every listing needs one")
    column = table.column(EMBEDDING).combine_chunks()
    if isinstance(column, pa.ExtensionArray):         # Ray's tensor column, when ray is imported
        column = column.storage
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)) or column.null_count:
        raise HierError(f"{EMBEDDING} of the embeddings table is {column.type}"
                        f"{' with missing rows' if column.null_count else ''}, not one vector a row")
    lengths = sorted(set(pc.list_value_length(column).to_numpy(zero_copy_only=False).tolist()))
    if len(lengths) > 1 or (dim is not None and set(lengths) - {dim}):
        raise HierError(f"{EMBEDDING} vectors of {' and '.join(map(str, lengths[:3]))} numbers"
                        f"{f', where the artifact embeds {dim}' if dim is not None else ''}: embed every listing "
                        "with the artifact the gallery is built in")
    width = lengths[0] if lengths else dim or 0
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), width)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():                 # a NaN or inf is in no search's answer: the listing would be lost
        raise HierError(f"listing {table.column('listing_id')[int(np.argmax(bad))].as_py()!r} of the embeddings "
                        f"table has a vector with a missing, NaN or infinite number ({int(bad.sum())} such rows)")
    rows = _as_text(table.drop_columns([EMBEDDING]).to_pandas())
    rows = rows.astype(object).where(rows.notna(), np.nan)
    repeat = first_repeat(rows["listing_id"])
    if repeat:
        raise HierError(f"listing_id {repeat[0]!r} is in two rows of the embeddings table; embed each listing once")
    return vectors, rows


def build_gallery(artifact_dir: str | Path, folder: str | Path, kind: str = "flat"):
    """``hier index build ARTIFACT --from-embeddings EMB/``: the gallery of the shards' vectors, no network
    run. Their answers are those of the artifact's head of now (an enrolled class included); the index
    is trained unlocked and saved under the lock if the artifact is still the one read."""
    return _gallery_of(artifact_dir, kind, lambda net: read_embeddings(folder, net.fingerprint()))


def gallery_of_table(artifact_dir: str | Path, table: pa.Table, kind: str = "flat"):
    """The gallery of a table of ``BatchEmbedder``'s rows that another job wrote, saved in the artifact as
    ``build_gallery`` saves it (answers of the head of now, no network run).

    Args:
        artifact_dir: the artifact whose weights embedded the rows.
        table: the rows, e.g. ``pyarrow.parquet.read_table`` of a Ray Data ``write_parquet`` folder.
        kind: the index kind (``flat``, ``ivf``, ``hnsw``, ``pq``; as ``--index``).

    Returns:
        The ``Gallery``, saved in ``artifact_dir``.

    Raises:
        HierError: no ``listing_id`` or ``hier_embedding`` column, vectors of another size than the
            artifact's embedding, a listing twice, an unknown kind, an artifact that changed meanwhile.
            Unlike ``hier embed`` shards, such a table carries no fingerprint of the weights and no
            count of its parts: it must come from this artifact's weights, and all of it.

    Example:
        >>> gallery_of_table("runs/base", pyarrow.parquet.read_table("emb_ray/"), kind="ivf")
    """
    return _gallery_of(artifact_dir, kind, lambda net: table_embeddings(table, net.cfg.embed_dim))


def _gallery_of(artifact_dir: str | Path, kind: str, read):
    """``read(net) -> (vectors, rows)`` labelled by the head of now, indexed and saved (``build_gallery``)."""
    artifact_dir = Path(artifact_dir)
    factory_string(kind, 1)
    with fileio.locked(artifact_dir):
        stamp, net, taxonomy = artifact.snapshot(artifact_dir, device())
    vectors, rows = read(net)
    predictor = artifact_predictor(artifact_dir, net, "torch")
    labels = [label_columns(predictor.probs_of(vectors[s:s + LABEL_CHUNK]), taxonomy)
              for s in range(0, len(vectors), LABEL_CHUNK)] or [answer_columns(np.zeros(0, int), taxonomy)]
    rows = rows.drop(columns=[c for c in rows.columns if str(c).startswith(PREFIX)])
    rows = rows.assign(**{c: np.concatenate([part[c] for part in labels]) for c in labels[0]})
    gallery = Gallery.build(vectors, rows, kind, search_whitening(net), net.fingerprint(),
                            answers_digest(net, taxonomy))
    with fileio.locked(artifact_dir):
        if artifact.stamp(artifact_dir) != stamp:
            raise HierError(f"{artifact_dir} changed while the gallery was built; run the command again")
        gallery.save(artifact_dir)
    return gallery
