"""Gallery benchmark: index kinds at 1M (and 10M) listings of real embeddings, perturbed.

The listings: the dev photos (``../shared/data/stanford-cars-dev/train``) embedded by ARTIFACT, then
listing r made from photo r % photos as normalise(z + noise) (``Noise``: ``--noise-model within-class``,
the default, varies a listing the way photos of one car model vary, scaled by ``--noise``;
``isotropic`` adds the same Gaussian noise in every direction, which fills dimensions real embeddings
do not use); the queries are fresh perturbations of the photos (another seed). Listings are generated
``--chunk`` at a time, each chunk from its own seed, so the 10M gallery and its exact search never hold
every vector. Every kind
is built with hier's own ``Gallery`` (so with the artifact's search whitening inside the index, as
``hier index build`` would), and measured: bytes per listing (the saved ``index.faiss`` / N, and the pq
kind's re-rank ``vectors.npy`` beside it, searched from memory here: a served gallery reads it through the
page cache), build time
(train + add), single-query latency (queries one at a time, p50 / p95, on ``--threads`` threads) and
Recall@10 against exact search over the same gallery (and ann-benchmarks' epsilon 0.01 recall, which
also counts a returned listing within 1% of the exact 10th neighbour's distance), swept over nprobe /
efSearch; then the brand filter of ``similar --same-brand`` (one search with an ID selector) against
exact search on the allowed listings.

The embeddings are cached in ``~/.cache/hier-bench`` (``HIER_BENCH_CACHE``), keyed by the artifact's
weights fingerprint, its config and the photo list (paths, sizes, mtimes); nothing else is cached.
Prints sys.argv, the git commit and the load average before and after, as every benchmark here does.

    python scripts/bench_gallery.py /root/bench/enroll_cpumax/base --out runs/bench_gallery
    python scripts/bench_gallery.py ARTIFACT --sizes 20000 --queries 100 --kinds flat,pq    # smoke

``--sharded KIND`` measures galleries sharded by time instead: a base shard of N - days x day-size
listings (trained) and ``--days`` daily shards of ``--day-size``, each added through hier's own writer
(only that shard read and written, in a gallery folder under ``--out`` or a temp folder), then one
day dropped; queries one at a time over every shard (``Gallery.index``: for the IVF kinds one IVF index
reading every shard's lists) against one index of the same vectors trained alike, and Recall@10 of both
against exact search.

    python scripts/bench_gallery.py ARTIFACT --sharded ivf --queries 500 --nprobe 16,64

``--cold N`` also measures the pq gallery from disk (Linux): saved, its vectors file dropped from the
page cache, loaded as a restarted service loads it (without and with hier's read-ahead) and searched at
once, then N queries each with the file dropped just before it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from benchlib import machine

from hier import Recognizer, artifact
from hier.artifact.files import CONFIG, GALLERY, VECTORS
from hier.gallery import BASE, BRAND, RERANK, TRAIN_MIN, TRAIN_PER_LIST, Gallery, factory_string, label_columns, lists
from hier.gallery import store as gallery_store
from hier.metrics import answer
from hier.services import indexing
from hier.services.labelling import search_whitening

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev" / "train"
CACHE = Path(os.environ.get("HIER_BENCH_CACHE", Path.home() / ".cache" / "hier-bench"))
EPSILON = 0.01                         # epsilon recall's tolerance, ann-benchmarks' "Epsilon 0.01 Recall"


def embeddings(art: Path, photos: list[Path]) -> dict:
    """The photos' embeddings and answered brands, the artifact's search whitening (cached, see above)."""
    rec = Recognizer(art)
    net = rec.snapshot().net
    h = hashlib.md5(net.fingerprint().encode())
    h.update(json.dumps(artifact.read_config(art).get("model"), sort_keys=True).encode())
    for p in photos:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    path = CACHE / f"embeddings-{h.hexdigest()[:20]}.npz"
    if path.is_file():
        saved = np.load(path)
        return {k: saved[k] for k in saved.files} | {"cached": str(path)}
    t = time.perf_counter()
    out = rec.embed(photos)
    brand = answer(out["probs"], rec.taxonomy)[0]
    whitening = search_whitening(net)
    got = {"z": out["embedding"].astype(np.float32), "brand": brand.astype(np.int64),
           "whitening": np.eye(out["embedding"].shape[1], dtype=np.float32) if whitening is None else whitening,
           "seconds": np.float64(time.perf_counter() - t)}
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **got)
    tmp.replace(path)
    return got | {"cached": "no (embedded now)"}


class Noise:
    """How a listing is made from a real embedding z: normalise(z + e). ``isotropic``: e ~ N(0, s^2 I),
    the same in every one of the D directions (s per coordinate; 0.05 at 256-d is a norm of 0.8), which
    fills all D dimensions, where real embeddings use few; ``within-class``: e ~ N(0, s^2 C), C the
    covariance of the real photos around their class's mean, so a listing varies from its photo the way
    photos of one car model vary (s = 1: as much as another photo of the class), in the directions
    real embeddings span."""

    def __init__(self, model: str, scale: float, z: np.ndarray, classes: np.ndarray):
        self.model, self.scale = model, scale
        if model == "within-class":
            _, inverse = np.unique(classes, return_inverse=True)
            means = np.stack([z[inverse == c].mean(0) for c in range(inverse.max() + 1)])
            lam, vec = np.linalg.eigh(np.cov((z - means[inverse]).T.astype(np.float64)))
            self.root = (vec * np.sqrt(np.clip(lam, 0, None))).T.astype(np.float32)   # e = g @ root
        elif model != "isotropic":
            raise SystemExit(f"--noise-model: isotropic or within-class, not {model!r}")

    def __call__(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = rng.standard_normal(z.shape, dtype=np.float32)
        x = z + self.scale * (g if self.model == "isotropic" else g @ self.root)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def listing_chunks(z: np.ndarray, n: int, noise: Noise, seed: int, chunk: int):
    """The n listings as (first row, vectors) chunks, listing r made from photo r % len(z): each chunk
    regenerated alike from its own seed, so a 10M gallery is never whole in memory."""
    for c, s in enumerate(range(0, n, chunk)):
        yield s, noise(z[np.arange(s, min(n, s + chunk)) % len(z)], np.random.default_rng([seed, 1, c]))


def whiten(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What a whitened gallery searches in (``hier.gallery.whitened``): normalise(x @ W)."""
    y = x @ w
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


class TopK:
    """The best k (similarity, id) of each query over chunks of the gallery, merged as they come."""

    def __init__(self, queries: int, k: int = 10):
        self.d = np.full((queries, k), -np.inf, np.float32)
        self.i = np.full((queries, k), -1, np.int64)

    def update(self, d: np.ndarray, i: np.ndarray, rows: np.ndarray | slice = slice(None)) -> None:
        both_d = np.hstack([self.d[rows], np.where(i >= 0, d, -np.inf)])
        both_i = np.hstack([self.i[rows], i])
        top = np.argsort(-both_d, axis=1, kind="stable")[:, :self.d.shape[1]]
        self.d[rows], self.i[rows] = np.take_along_axis(both_d, top, 1), np.take_along_axis(both_i, top, 1)


def exact(chunks, w: np.ndarray, queries: np.ndarray, groups: np.ndarray, group_of_query: np.ndarray,
          filtered: int, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k ids of each query in the whitened gallery, its k-th similarity, and the top-k ids of
    the first ``filtered`` queries among the listings of their group (brand) only: the truth every kind
    is measured against, one pass over the chunks."""
    q = whiten(queries, w)
    every, same = TopK(len(q), k), TopK(filtered, k)
    for s, x in chunks:
        y = whiten(x, w)
        d, i = faiss.knn(q, y, k, faiss.METRIC_INNER_PRODUCT)
        every.update(d, np.where(i >= 0, i + s, -1))
        g = groups[s:s + len(x)]
        for b in np.unique(group_of_query[:filtered]):
            rows, cols = np.flatnonzero(group_of_query[:filtered] == b), np.flatnonzero(g == b)
            if len(cols):
                d, i = faiss.knn(q[rows], y[cols], min(k, len(cols)), faiss.METRIC_INNER_PRODUCT)
                same.update(d, np.where(i >= 0, cols[np.maximum(i, 0)] + s, -1), rows)
    return every.i, every.d[:, -1], same.i


def true_similarities(chunks, w: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The exact similarity of each returned id (row i of ``ids`` answers query i) to its query, one
    pass over the chunks (-inf where nothing was returned)."""
    q = whiten(queries, w)
    out = np.full(ids.shape, -np.inf, np.float32)
    for s, x in chunks:
        r, c = np.nonzero((ids >= s) & (ids < s + len(x)))
        if len(r):
            out[r, c] = np.sum(whiten(x[ids[r, c] - s], w) * q[r], axis=1)
    return out


def epsilon_recall(sims: np.ndarray, kth: np.ndarray, eps: float = EPSILON) -> float:
    """ann-benchmarks' epsilon recall: the share of returned listings no farther from the query than
    (1 + eps) x the exact k-th neighbour's distance (unit vectors: distance = sqrt(2 - 2 similarity)):
    a listing about as near as the exact one it displaced counts, as where copies of one photo tie."""
    dist = np.sqrt(np.clip(2 - 2 * sims, 0, None))
    return float(np.mean(dist <= (1 + eps) * np.sqrt(np.clip(2 - 2 * kth, 0, None))[:, None]))


def effective_dims(x: np.ndarray, w: np.ndarray) -> float:
    """The participation ratio (sum lambda)^2 / sum lambda^2 of the whitened vectors' covariance: how
    many dimensions the vectors really fill (D when isotropic), what a compressed code must keep."""
    lam = np.linalg.eigvalsh(np.cov(whiten(x, w).T.astype(np.float64)))
    return float(lam.sum() ** 2 / (lam ** 2).sum())


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Recall@10: the share of the exact top-10 among the 10 returned, over queries."""
    return float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(got, truth)]))


def one_at_a_time(search, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids of each query searched alone, and each search's latency in ms."""
    ids, ms = [], []
    for q in queries:
        t = time.perf_counter()
        _, i = search(q[None])
        ms.append(1000 * (time.perf_counter() - t))
        ids.append(i[0])
    return np.array(ids), np.array(ms)


def sweep(kind: str, args) -> list[tuple[str, dict]]:
    """The search settings measured per kind: nprobe for the IVF kinds, efSearch for HNSW."""
    if kind == "pq":
        return [(f"nprobe {p}, re-rank {r}x", {"nprobe": p, "rerank": r}) for p in args.nprobe for r in args.rerank]
    if kind == "ivf":
        return [(f"nprobe {p}", {"nprobe": p}) for p in args.nprobe]
    if kind == "hnsw":
        return [(f"efSearch {e}", {"ef_search": e}) for e in args.ef]
    return [("exact", {})]


def fresh_queries(z: np.ndarray, noise: Noise, args) -> tuple[np.ndarray, np.ndarray]:
    """``--queries`` photos drawn at random and fresh perturbations of them (seeds of their own)."""
    photo = np.random.default_rng([args.seed, 2]).integers(0, len(z), args.queries)
    return photo, noise(z[photo], np.random.default_rng([args.seed, 3]))


def listings_of(rows: np.ndarray, brands: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"listing_id": np.char.add("L", rows.astype(str)).astype(object), BRAND: brands[rows % len(brands)]})


def built(kind: str, factory: str | None, n: int, chunks, w: np.ndarray, brands: np.ndarray) -> tuple[Gallery, float]:
    """A gallery of ``kind`` (or ``factory``) for n listings as ``hier index build`` makes it, fed chunk by
    chunk: trained on its sample of the first chunk (which holds every photo), then the rest added; and
    the seconds its training and adds took (the listings' generation not counted)."""
    g, seconds = None, 0.0
    for s, x in chunks:
        part = listings_of(np.arange(s, s + len(x)), brands)
        t = time.perf_counter()
        if g is None:
            g = Gallery.build(x, part, kind, w, factory=factory or factory_string(kind, n, x.shape[1]))
        else:
            g.add(x, part)
        seconds += time.perf_counter() - t
    return g, seconds


def bench_size(n: int, e: dict, args) -> list[dict]:
    z, w, brands, noise = e["z"], e["whitening"], e["brand"], e["noise"]
    chunk = max(args.chunk, TRAIN_MIN, TRAIN_PER_LIST * lists(n))   # the first chunk holds the training sample

    def chunks():
        return listing_chunks(z, n, noise, args.seed, chunk)
    t = time.perf_counter()
    q_base, queries = fresh_queries(z, noise, args)
    listing_brand, query_brand = brands[np.arange(n) % len(z)], brands[q_base]
    nf = min(args.filter_queries, args.queries)
    truth, kth, truth_f = exact(chunks(), w, queries, listing_brand, query_brand, nf)
    own = float(np.mean(truth % len(z) == q_base[:, None]))
    first = next(listing_chunks(z, min(n, 200_000), noise, args.seed, 200_000))[1]   # the first chunk's first rows
    print(json.dumps({"listings": n, "noise": noise.model, "scale": noise.scale, "data_s": round(time.perf_counter() - t, 1),
                      "exact_top10_from_the_query_photo": round(own, 3),
                      "effective_dims": {"photos": round(effective_dims(z, w), 1),
                                         "listings": round(effective_dims(first, w), 1)}}), flush=True)
    first = None
    rows = []
    builds = [(kind, None) for kind in args.kinds] + [("pq", c.format(nlist=lists(n))) for c in args.candidates]
    for kind, factory in builds:
        if kind == "flat" and n > args.flat_max:
            continue
        g, build_s = built(kind, factory, n, chunks(), w, brands)
        size = len(g._index_bytes()) / n
        beside = sum(s.exact.nbytes for s in g.shards.values() if s.exact is not None) / n   # pq's vectors.npy
        name = kind if factory is None else f"candidate {factory}"
        kind_rows, returned = [], []
        for label, setting in sweep(kind, args):
            got, ms = one_at_a_time(lambda q, g=g, s=setting: g.search(q, 10, **s), queries)
            returned.append(got)
            kind_rows.append({"listings": n, "noise": f"{noise.model} {noise.scale}", "kind": name,
                              "factory": factory or factory_string(kind, n, z.shape[1]), "setting": label,
                              "bytes_per_listing": round(size, 1), "vectors_file_bytes_per_listing": round(beside, 1),
                              "build_s": round(build_s, 1),
                              "p50_ms": round(float(np.percentile(ms, 50)), 3),
                              "p95_ms": round(float(np.percentile(ms, 95)), 3),
                              "recall@10": round(recall(got, truth), 3),
                              "1-recall@10": round(float(np.mean([t[0] in set(a) for a, t in zip(got, truth)])), 3),
                              "loadavg": [round(v, 2) for v in os.getloadavg()]})
        sims = true_similarities(chunks(), w, np.tile(queries, (len(returned), 1)), np.concatenate(returned))
        for row, part in zip(kind_rows, np.split(sims, len(returned))):
            row[f"epsilon{EPSILON}_recall@10"] = round(epsilon_recall(part, kth), 3)
            print(json.dumps(row), flush=True)
        rows += kind_rows
        if factory is not None:                    # candidates: the unfiltered frontier only
            g = None
            continue
        # the brand filter of `similar --same-brand`: one search with an ID selector per query
        where_ms, got = [], []
        for i in range(nf):
            t = time.perf_counter()
            [r] = g.results(queries[i], 10, where=lambda rows, b=query_brand[i]: rows[BRAND] == b)
            where_ms.append(1000 * (time.perf_counter() - t))
            ids = r["hier_id"].to_numpy()
            assert (listing_brand[ids] == query_brand[i]).all()
            got.append(np.pad(ids, (0, 10 - len(ids)), constant_values=-1))
        default = g.nprobe if kind in ("ivf", "pq") else g.ef_search if kind == "hnsw" else "exact"
        row = {"listings": n, "noise": f"{noise.model} {noise.scale}", "kind": name,
               "setting": f"same brand, default ({default})",
               "p50_ms": round(float(np.percentile(where_ms, 50)), 3),
               "p95_ms": round(float(np.percentile(where_ms, 95)), 3),
               "recall@10": round(recall(np.array(got), truth_f), 3), "loadavg": [round(v, 2) for v in os.getloadavg()]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if kind == "pq" and args.cold:
            rows += bench_cold(g, queries, truth, n, args)
        if kind == "pq" and not args.embeddings:          # (a cache file as it is: the artifact is not read)
            rows.append(label_all(g, args.artifact, n))
        g = None                                   # freed before the next kind is built
    return rows


def bench_sharded(n: int, e: dict, args) -> list[dict]:
    """The sharded layout at n listings (see the module's docstring)."""
    z, w, noise = e["z"], e["whitening"], e["noise"]
    base_n = n - args.days * args.day_size
    x = np.concatenate([x for _, x in listing_chunks(z, n, noise, args.seed, args.chunk)])
    _, queries = fresh_queries(z, noise, args)
    truth, _, _ = exact([(0, x)], w, queries, np.zeros(n, np.int64), np.zeros(len(queries), np.int64), 0)
    listings = listings_of(np.arange(n), e["brand"])
    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.out))
    (work / CONFIG).write_text('{"fingerprint": "bench"}')
    rows, kind = [], args.sharded
    try:
        t = time.perf_counter()
        g = Gallery.build(x[:base_n], listings.iloc[:base_n], kind, w, fingerprint="bench")
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        g.save(work)
        save_s = time.perf_counter() - t
        g = None
        add_s, clash_s = [], []
        for d in range(args.days):
            a, b = base_n + d * args.day_size, base_n + (d + 1) * args.day_size
            day = f"2025-01-{d + 1:02d}" if d < 31 else f"day{d}"
            t = time.perf_counter()
            indexing.refuse_clashes(work, listings.iloc[a:b])        # every shard's listing ids read
            clash_s.append(time.perf_counter() - t)
            t = time.perf_counter()                                  # what `hier index add --shard` does
            part = Gallery.load(work, only=[day])
            part.add(x[a:b], listings.iloc[a:b], day)
            part.save(work, only=[day])
            add_s.append(time.perf_counter() - t)
        whole = Gallery.load(work)
        one = Gallery.load(work, only=[BASE])                        # one index of everything, trained alike
        one.next_id = base_n                                         # the same ids as the shards'
        one.add(x[base_n:], listings.iloc[base_n:])
        for p in args.nprobe:
            got = {}
            for name, g in (("sharded", whole), ("one index", one)):
                got[name], ms = one_at_a_time(lambda q, g=g: g.search(q, 10, nprobe=p), queries)
                row = {"listings": n, "kind": f"{kind}, {name}" + (f" (base {base_n:,} + {args.days} x "
                       f"{args.day_size:,})" if name == "sharded" else ""), "setting": f"nprobe {p}",
                       "p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
                       "recall@10": round(recall(got[name], truth), 3), "loadavg": [round(v, 2) for v in os.getloadavg()]}
                print(json.dumps(row), flush=True)
                rows.append(row)
            same = float(np.mean(got["sharded"] == got["one index"]))
            print(json.dumps({"nprobe": p, "sharded ids equal to one index's": round(same, 4)}), flush=True)
            rows[-2]["same_ids_as_one_index"] = round(same, 4)
        whole = one = None
        t = time.perf_counter()
        indexing.drop(work, "2025-01-01")
        drop_s = time.perf_counter() - t
        row = {"listings": n, "kind": kind, "setting": "sharded writes", "base_build_s": round(build_s, 1),
               "base_save_s": round(save_s, 1), "add_day_s_median": round(float(np.median(add_s)), 3),
               "add_day_s_max": round(float(np.max(add_s)), 3),
               "clash_check_s_median": round(float(np.median(clash_s)), 3), "drop_day_s": round(drop_s, 4),
               "loadavg": [round(v, 2) for v in os.getloadavg()]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def evict(vectors: np.ndarray | None, path: Path) -> None:
    """``path`` out of the page cache: the pages a memory map of it holds are let go first and a file
    just written is flushed (the kernel keeps mapped and dirty pages), then its cached pages dropped
    (``POSIX_FADV_DONTNEED``)."""
    if vectors is not None and isinstance(vectors.base, mmap.mmap):       # ``hier.gallery.mapped_rows``' map
        vectors.base.madvise(mmap.MADV_DONTNEED)
        vectors.base.madvise(mmap.MADV_RANDOM)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> str:
    """How much of ``path`` the page cache holds, by util-linux's ``fincore`` (what the eviction did)."""
    try:
        return subprocess.run(["fincore", "-nb", "-o", "RES", str(path)], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "fincore not found"


def bench_cold(g: Gallery, queries: np.ndarray, truth: np.ndarray, n: int, args) -> list[dict]:
    """The pq gallery searched from disk, its ``vectors.npy`` out of the page cache: saved as ``hier
    index`` saves it, then (1) loaded as a restarted service loads it, without and with hier's prefetch
    (``hier.gallery.prefetch``), the queries searched at once one at a time (latency of the first 20, the next
    80, the rest); (2) every query with the file evicted just before it (a gallery too big for memory)."""
    folder = Path(tempfile.mkdtemp(prefix="cold-", dir=args.out))
    fingerprint = g.fingerprint
    try:
        g.fingerprint = "bench-cold"
        (folder / CONFIG).write_text('{"fingerprint": "bench-cold"}')
        g.save(folder)
        path = folder / GALLERY / VECTORS
        rows, warm = [], gallery_store.prefetch

        def row(setting, ms, got):
            windows = {"first 20": ms[:20], "21-100": ms[20:100], "the rest": ms[100:]}
            r = {"listings": n, "kind": "pq from disk", "setting": setting, "queries": len(ms),
                 **{f"{w} p50/p95 ms": [round(float(np.percentile(v, q)), 2) for q in (50, 95)]
                    for w, v in windows.items() if len(v)},
                 "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
                 "recall@10": round(recall(got, truth[:len(got)]), 3), "loadavg": [round(v, 2) for v in os.getloadavg()]}
            print(json.dumps(r), flush=True)
            return r
        for setting, prefetch in (("restart, no prefetch", lambda path: None), ("restart, prefetch (default)", warm)):
            evict(None, path)
            resident = cached_bytes(path)
            gallery_store.prefetch = prefetch
            try:
                t = time.perf_counter()
                loaded = Gallery.load(folder)
                load_s = time.perf_counter() - t
                got, ms = one_at_a_time(lambda q: loaded.search(q, 10), queries)
            finally:
                gallery_store.prefetch = warm
            rows.append(row(setting, ms, got) | {"load_s": round(load_s, 2),
                                                 "cached_bytes_before": resident})
            loaded = None
        gallery_store.prefetch = lambda path: None        # nothing warms the file behind the evictions
        try:
            loaded, ids, ms = Gallery.load(folder), [], []
            for q in queries[:args.cold]:
                evict(loaded.shards["base"].exact, path)
                t = time.perf_counter()
                ids.append(loaded.search(q[None], 10)[1][0])
                ms.append(1000 * (time.perf_counter() - t))
        finally:
            gallery_store.prefetch = warm
        rows.append(row("every query evicted before it", np.array(ms), np.array(ids)))
        return rows
    finally:
        g.fingerprint = fingerprint
        shutil.rmtree(folder, ignore_errors=True)


def label_all(g: Gallery, art: Path, n: int) -> dict:
    """The one-off cost of `similar --same-brand` on a gallery: every listing answered by the head of
    now (``Gallery.labelled``), once per version of the artifact."""
    snap = Recognizer(art).snapshot()

    def labels(vectors):
        return label_columns(snap.predictor.probs_of(vectors), snap.taxonomy)
    t = time.perf_counter()
    g.labelled(labels)
    row = {"listings": n, "kind": g.kind, "setting": "every listing labelled by the head of now (once per version)",
           "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"\n| listings | kind | setting | index bytes/listing (+ vectors.npy) | build s | p50 ms | p95 ms | Recall@10 | 1-Recall@10 | "
          f"epsilon {EPSILON} recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "p50_ms" in r and "bytes_per_listing" not in r and "build_s" not in r:
            print(f"| {r['listings']:,} | {r['kind']} | {r['setting']} | | | {r['p50_ms']} | {r['p95_ms']} | "
                  f"{r['recall@10']} | | |")
        elif "p50_ms" in r:
            beside = f" (+{r['vectors_file_bytes_per_listing']:g})" if r.get("vectors_file_bytes_per_listing") else ""
            print(f"| {r['listings']:,} | {r['kind']} | {r['setting']} | {r.get('bytes_per_listing', '')}{beside} | "
                  f"{r.get('build_s', '')} | {r['p50_ms']} | {r['p95_ms']} | {r['recall@10']} | "
                  f"{r.get('1-recall@10', '')} | {r.get(f'epsilon{EPSILON}_recall@10', '')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--photos", type=Path, default=SHARED)
    ap.add_argument("--embeddings", type=Path, default=None,
                    help="an embeddings-*.npz of the cache to use as it is (no photo embedded, the artifact not read)")
    ap.add_argument("--embed-only", action="store_true", help="embed (and cache) the photos, then stop")
    ap.add_argument("--sizes", default="1000000", help="gallery sizes, comma-separated")
    ap.add_argument("--kinds", default="flat,ivf,hnsw,pq")
    ap.add_argument("--noise-model", default="within-class", help="how listings vary from their photo: "
                    "within-class (as photos of one car model do) or isotropic (the same in every direction)")
    ap.add_argument("--noise", type=float, default=None,
                    help="the noise's scale: within-class 0.5 (of a class's spread), isotropic 0.05 (per coordinate)")
    ap.add_argument("--chunk", type=int, default=500_000, help="listings generated (and added) at a time")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--filter-queries", type=int, default=200, help="of the queries, searched with the brand filter")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nprobe", default="4,8,16,32,64,128")
    ap.add_argument("--ef", default="16,32,64,128,256")
    ap.add_argument("--rerank", default=str(RERANK), help="pq: candidates re-ranked per answer wanted, comma-separated")
    ap.add_argument("--candidates", default="",
                    help="other index_factory strings to measure as the pq kind, ';'-separated, {nlist} = the kind's")
    ap.add_argument("--flat-max", type=int, default=2_000_000, help="largest gallery the flat kind is built for")
    ap.add_argument("--sharded", default=None, help="measure the time-sharded layout of this kind (ivf, pq, flat)")
    ap.add_argument("--days", type=int, default=30, help="--sharded: daily shards")
    ap.add_argument("--day-size", type=int, default=10_000, help="--sharded: listings a day")
    ap.add_argument("--cold", type=int, default=0, help="pq: also search it from disk with a cold page cache "
                    "(restarted, and this many queries each evicted before it; written under --out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = ap.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.candidates = [c for c in args.candidates.split(";") if c]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    args.ef = [int(v) for v in args.ef.split(",")]
    args.rerank = [int(v) for v in args.rerank.split(",")]
    faiss.omp_set_num_threads(args.threads)
    before = machine()
    print(json.dumps({"machine": before, "threads": args.threads, "faiss": faiss.__version__}), flush=True)
    photos = sorted(args.photos.glob("*/*.jpg"))
    if args.embeddings:                            # a cache file as it is (the artifact is not read)
        e = dict(np.load(args.embeddings)) | {"cached": str(args.embeddings)}
    else:
        e = embeddings(args.artifact, photos)
    classes = np.array([p.parent.name for p in photos])
    if len(classes) != len(e["z"]):
        raise SystemExit(f"{len(e['z'])} embeddings but {len(photos)} photos in {args.photos}")
    scale = args.noise if args.noise is not None else 0.5 if args.noise_model == "within-class" else 0.05
    e["noise"] = Noise(args.noise_model, scale, e["z"], classes)
    print(json.dumps({"photos": len(photos), "dim": int(e["z"].shape[1]), "embed_s": round(float(e["seconds"]), 1),
                      "cache": e["cached"]}), flush=True)
    if args.embed_only:
        return
    bench = bench_sharded if args.sharded else bench_size
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = [r for n in (int(v) for v in args.sizes.split(",")) for r in bench(n, e, args)]
    after = [round(v, 2) for v in os.getloadavg()]
    print_table(rows)
    print(json.dumps({"argv": sys.argv, "commit": before["commit"], "loadavg_before": before["loadavg"],
                      "loadavg_after": after}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"machine": before, "loadavg_after": after, "rows": rows},
                                                          indent=1))


if __name__ == "__main__":
    main()
