"""Gallery benchmark: index kinds at 1M (and 10M) listings of real embeddings, perturbed.

The listings: the dev photos (``../shared/data/stanford-cars-dev/train``) embedded by ARTIFACT, then each
embedding repeated N / photos times with Gaussian noise of std ``--noise`` per coordinate added and the
result renormalised; the queries are fresh perturbations of the same photos (another seed). Every kind
is built with hier's own ``Gallery`` (so with the artifact's search whitening inside the index, as
``hier index build`` would), and measured: bytes per listing (the saved ``index.faiss`` / N), build time
(train + add), single-query latency (queries one at a time, p50 / p95, on ``--threads`` threads) and
Recall@10 against exact search over the same gallery, swept over nprobe / efSearch; then the brand
filter of ``similar --same-brand`` (one search with an ID selector) against exact search on the allowed
listings.

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
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from benchlib import machine
from hier import Recognizer, artifact
from hier import index as gallery_ops
from hier.index import BRAND, Gallery, factory_string, lists, search_whitening
from hier.metrics import answer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev" / "train"
CACHE = Path(os.environ.get("HIER_BENCH_CACHE", Path.home() / ".cache" / "hier-bench"))


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


def perturbed(z: np.ndarray, base: np.ndarray, noise: float, seed: int, chunk: int = 250_000) -> np.ndarray:
    """normalise(z[base] + N(0, noise^2 I)), built chunk by chunk (n x D float32, nothing larger)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(base), z.shape[1]), np.float32)
    for s in range(0, len(base), chunk):
        x = z[base[s:s + chunk]] + rng.normal(0, noise, (len(base[s:s + chunk]), z.shape[1])).astype(np.float32)
        out[s:s + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def whiten(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What a whitened gallery searches in (``hier.index.whitened``): normalise(x @ W)."""
    y = x @ w
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def exact(x: np.ndarray, w: np.ndarray, queries: np.ndarray, groups: np.ndarray | None = None,
          group_of_query: np.ndarray | None = None, k: int = 10, chunk: int = 500_000) -> np.ndarray:
    """Exact top-k ids of each query in the whitened gallery, chunk by chunk (merged), restricted to the
    query's group (brand) when ``groups`` is given: the truth every kind is measured against."""
    q = whiten(queries, w)
    best_d = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(x), chunk):
        y = whiten(x[s:s + chunk], w)
        if groups is None:
            d, i = faiss.knn(q, y, k, faiss.METRIC_INNER_PRODUCT)
            i = np.where(i >= 0, i + s, -1)
        else:
            d = np.full((len(q), k), -np.inf, np.float32)
            i = np.full((len(q), k), -1, np.int64)
            g = groups[s:s + chunk]
            for b in np.unique(group_of_query):
                rows, cols = np.flatnonzero(group_of_query == b), np.flatnonzero(g == b)
                if len(cols):
                    gd, gi = faiss.knn(q[rows], y[cols], min(k, len(cols)), faiss.METRIC_INNER_PRODUCT)
                    d[rows, :gd.shape[1]] = np.where(gi >= 0, gd, -np.inf)
                    i[rows, :gd.shape[1]] = np.where(gi >= 0, cols[np.maximum(gi, 0)] + s, -1)
        both_d, both_i = np.hstack([best_d, d]), np.hstack([best_i, i])
        top = np.argsort(-both_d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(both_d, top, 1), np.take_along_axis(both_i, top, 1)
    return best_i


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
    if kind in ("ivf", "pq"):
        return [(f"nprobe {p}", {"nprobe": p}) for p in args.nprobe]
    if kind == "hnsw":
        return [(f"efSearch {e}", {"ef_search": e}) for e in args.ef]
    return [("exact", {})]


def bench_size(n: int, e: dict, args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    z, w, brands = e["z"], e["whitening"], e["brand"]
    base = np.arange(n) % len(z)
    t = time.perf_counter()
    x = perturbed(z, base, args.noise, args.seed)
    q_base = rng.integers(0, len(z), args.queries)
    queries = perturbed(z, q_base, args.noise, args.seed + 1)      # fresh perturbations, another seed
    listing_brand, query_brand = brands[base], brands[q_base]
    truth = exact(x, w, queries)
    nf = min(args.filter_queries, args.queries)
    truth_f = exact(x, w, queries[:nf], listing_brand, query_brand[:nf])
    own = float(np.mean(base[truth] == q_base[:, None]))
    print(json.dumps({"listings": n, "noise": args.noise, "data_s": round(time.perf_counter() - t, 1),
                      "exact_top10_from_the_query_photo": round(own, 3)}), flush=True)
    listings = pd.DataFrame({"listing_id": np.char.add("L", np.arange(n).astype(str)).astype(object),
                             BRAND: listing_brand})
    rows = []
    builds = [(kind, None) for kind in args.kinds] + [("pq", c.format(nlist=lists(n))) for c in args.candidates]
    for kind, factory in builds:
        if kind == "flat" and n > args.flat_max:
            continue
        t = time.perf_counter()
        g = Gallery.build(x, listings, kind, w, factory=factory)
        build_s = time.perf_counter() - t
        size = len(g._index_bytes()) / n
        name = kind if factory is None else f"candidate {factory}"
        for label, setting in sweep(kind, args):
            got, ms = one_at_a_time(lambda q, g=g, s=setting: g.search(q, 10, **s), queries)
            row = {"listings": n, "kind": name, "factory": factory or factory_string(kind, n), "setting": label,
                   "bytes_per_listing": round(size, 1), "build_s": round(build_s, 1),
                   "p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
                   "recall@10": round(recall(got, truth), 3),
                   "1-recall@10": round(float(np.mean([t[0] in set(a) for a, t in zip(got, truth)])), 3),
                   "loadavg": [round(v, 2) for v in os.getloadavg()]}
            print(json.dumps(row), flush=True)
            rows.append(row)
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
        row = {"listings": n, "kind": name, "setting": f"same brand, default ({default})",
               "p50_ms": round(float(np.percentile(where_ms, 50)), 3),
               "p95_ms": round(float(np.percentile(where_ms, 95)), 3),
               "recall@10": round(recall(np.array(got), truth_f), 3), "loadavg": [round(v, 2) for v in os.getloadavg()]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if kind == "pq" and args.artifact is not None:
            rows.append(label_all(g, args.artifact, n))
        g = None                                   # freed before the next kind is built
    return rows


def bench_sharded(n: int, e: dict, args) -> list[dict]:
    """The sharded layout at n listings (see the module's docstring)."""
    rng = np.random.default_rng(args.seed)
    z, w = e["z"], e["whitening"]
    base_n = n - args.days * args.day_size
    base = np.arange(n) % len(z)
    x = perturbed(z, base, args.noise, args.seed)
    q_base = rng.integers(0, len(z), args.queries)
    queries = perturbed(z, q_base, args.noise, args.seed + 1)
    truth = exact(x, w, queries)
    listings = pd.DataFrame({"listing_id": np.char.add("L", np.arange(n).astype(str)).astype(object)})
    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.out))
    (work / "config.json").write_text('{"fingerprint": "bench"}')
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
            gallery_ops.refuse_clashes(work, listings.iloc[a:b])     # every shard's listing ids read
            clash_s.append(time.perf_counter() - t)
            t = time.perf_counter()                                  # what `hier index add --shard` does
            part = Gallery.load(work, only=[day])
            part.add(x[a:b], listings.iloc[a:b], day)
            part.save(work, only=[day])
            add_s.append(time.perf_counter() - t)
        whole = Gallery.load(work)
        one = Gallery.load(work, only=[gallery_ops.BASE])            # one index of everything, trained alike
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
        gallery_ops.drop(work, "2025-01-01")
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


def label_all(g: Gallery, art: Path, n: int) -> dict:
    """The one-off cost of `similar --same-brand` on a gallery: every listing answered by the head of
    now (``Gallery.labelled``), once per version of the artifact."""
    from hier.index import label_columns
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
    print("\n| listings | kind | setting | bytes/listing | build s | p50 ms | p95 ms | Recall@10 | 1-Recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "p50_ms" in r and "bytes_per_listing" not in r and "build_s" not in r:
            print(f"| {r['listings']:,} | {r['kind']} | {r['setting']} | | | {r['p50_ms']} | {r['p95_ms']} | "
                  f"{r['recall@10']} | |")
        elif "p50_ms" in r:
            print(f"| {r['listings']:,} | {r['kind']} | {r['setting']} | {r.get('bytes_per_listing', '')} | "
                  f"{r.get('build_s', '')} | {r['p50_ms']} | {r['p95_ms']} | {r['recall@10']} | "
                  f"{r.get('1-recall@10', '')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--photos", type=Path, default=SHARED)
    ap.add_argument("--embeddings", type=Path, default=None,
                    help="an embeddings-*.npz of the cache to use as it is (no photo embedded, the artifact not read)")
    ap.add_argument("--embed-only", action="store_true", help="embed (and cache) the photos, then stop")
    ap.add_argument("--sizes", default="1000000", help="gallery sizes, comma-separated")
    ap.add_argument("--kinds", default="flat,ivf,hnsw,pq")
    ap.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian noise per coordinate")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--filter-queries", type=int, default=200, help="of the queries, searched with the brand filter")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nprobe", default="4,8,16,32,64,128")
    ap.add_argument("--ef", default="16,32,64,128,256")
    ap.add_argument("--candidates", default="",
                    help="other index_factory strings to measure as the pq kind, ';'-separated, {nlist} = the kind's")
    ap.add_argument("--flat-max", type=int, default=2_000_000, help="largest gallery the flat kind is built for")
    ap.add_argument("--sharded", default=None, help="measure the time-sharded layout of this kind (ivf, pq, flat)")
    ap.add_argument("--days", type=int, default=30, help="--sharded: daily shards")
    ap.add_argument("--day-size", type=int, default=10_000, help="--sharded: listings a day")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = ap.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.candidates = [c for c in args.candidates.split(";") if c]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    args.ef = [int(v) for v in args.ef.split(",")]
    faiss.omp_set_num_threads(args.threads)
    before = machine()
    print(json.dumps({"machine": before, "threads": args.threads, "faiss": faiss.__version__}), flush=True)
    photos = sorted(args.photos.glob("*/*.jpg"))
    if args.embeddings:                            # a cache file as it is (the artifact is not read)
        e = dict(np.load(args.embeddings)) | {"cached": str(args.embeddings)}
    else:
        e = embeddings(args.artifact, photos)
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
