"""Few-shot enrollment and similar-listing benchmark on ../shared/data/stanford-cars-dev.

Holds out 20 classes (10 whose near sibling stays in training, 10 without one), trains hier on the
other 68 (``--preset cpu``), then enrolls every held-out class from k = 1, 5, 10 shots with and without
TEEN calibration, and reports: held-out accuracy (near-sibling / other), base-class accuracy before and
after, a logistic-regression head retrained on all 88 classes with the same embeddings (upper bound),
plain nearest-prototype classification over all 88 classes (frozen ImageNet features, then hier's
embedding: how far the embedding itself separates unseen classes), enroll vs retrain time, gallery
Recall@1/@5, and flat vs IVF search on a synthetic 1M x 256 gallery.

    python scripts/bench_enroll.py --out runs/bench_enroll
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression

from hier import artifact
from hier.enroll import (MAX_BASE_DROP, PROTOTYPES, Calibration, PrototypeMap, base_drop_offset, class_means,
                         VALIDATION, enroll, imprint, save_validation)
from hier.index import Gallery, factory_string
from hier.engine.predictor import Predictor
from hier.models import create_trunk
from hier.taxonomy import Taxonomy
from hier.data import ImageDataset, eval_transform, loader, scan_folder, split_indices
from hier.engine.trainer import configs, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NEAR_SIBLING = {   # held out -> the sibling that stays in training
    "Dodge Charger Sedan 2012": "Dodge Charger SRT-8 2009",
    "Chevrolet Silverado 1500 Extended Cab 2012": "Chevrolet Silverado 1500 Classic Extended Cab 2007",
    "Aston Martin Virage Coupe 2012": "Aston Martin Virage Convertible 2012",
    "Audi S5 Coupe 2012": "Audi S5 Convertible 2012",
    "BMW 1 Series Coupe 2012": "BMW 1 Series Convertible 2012",
    "Bugatti Veyron 16.4 Coupe 2009": "Bugatti Veyron 16.4 Convertible 2009",
    "Chevrolet Express Van 2007": "Chevrolet Express Cargo Van 2007",
    "Dodge Dakota Crew Cab 2010": "Dodge Dakota Club Cab 2007",
    "Dodge Ram Pickup 3500 Quad Cab 2009": "Dodge Ram Pickup 3500 Crew Cab 2010",
    "Audi TTS Coupe 2012": "Audi TT RS Coupe 2012",
}
NO_SIBLING = ["AM General Hummer SUV 2000", "Acura ZDX Hatchback 2012", "Bentley Mulsanne Sedan 2011",
              "Buick Enclave SUV 2012", "Chevrolet Sonic Sedan 2012", "Chrysler PT Cruiser Convertible 2008",
              "Daewoo Nubira Wagon 2002", "Dodge Caravan Minivan 1997", "Eagle Talon Hatchback 1998",
              "BMW X6 SUV 2012"]
POOL = 10   # shots are drawn from the first POOL photos of a held-out class; the rest are its test set


def held_out_split(data: Path, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    pool, test = {}, {}
    for c in [*NEAR_SIBLING, *NO_SIBLING]:
        files = sorted((data / c).glob("*.jpg"))
        files = [files[i] for i in rng.permutation(len(files))]
        pool[c], test[c] = files[:POOL], files[POOL:]
    return pool, test


def enroll_all(net, base_tax: Taxonomy, full_tax: Taxonomy, shots: dict[str, np.ndarray], cal: Calibration,
               mapping: PrototypeMap | None):
    """All held-out classes at once, in memory, through hier.enroll.imprint."""
    net = copy.deepcopy(net)
    rows = [{**full_tax.row(c)} for c in shots]
    tax = imprint(net, base_tax, rows, {c: torch.from_numpy(z.sum(0)) for c, z in shots.items()}, cal, mapping)
    return net, tax


def imagenet_features(net, pretrained: str):
    """Pooled features of the trunk as pretrained, before any training on cars, L2-normalised (the
    issue's "for scale" baseline)."""
    trunk = create_trunk(net.cfg.trunk, pretrained).eval()

    @torch.no_grad()
    def features(paths: list[Path]) -> np.ndarray:
        data = loader(ImageDataset(paths, None, eval_transform(net.cfg.img_size, net.cfg.mean, net.cfg.std)), 64)
        return torch.nn.functional.normalize(torch.cat([trunk(x) for x, _ in data]), dim=1).numpy()
    return features


def cached_features(path: Path, features, base_paths, pool: dict, test: dict):
    """features() of the base photos and of each held-out class's pool and test photos, kept in ``path``."""
    if not path.is_file():
        np.savez(path, base=features(base_paths), **{f"pool{i}": features(pool[c]) for i, c in enumerate(pool)},
                 **{f"test{i}": features(test[c]) for i, c in enumerate(test)})
    saved = np.load(path)
    return (saved["base"], {c: saved[f"pool{i}"] for i, c in enumerate(pool)},
            {c: saved[f"test{i}"] for i, c in enumerate(test)})


def nearest_prototype(z_base, y_base, tr, va, z_pool, z_test, k: int) -> dict:
    """Nearest class mean over base + held-out prototypes (base from its training photos, held-out from
    k shots): held-out accuracy and base accuracy before/after the held-out prototypes join."""
    base = class_means(z_base[tr], y_base[tr], int(y_base.max()) + 1)
    protos = np.vstack([base, [z_pool[c][:k].mean(0) for c in z_pool]])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    nb = len(base)
    acc = {c: float(((z_test[c] @ protos.T).argmax(1) == nb + i).mean()) for i, c in enumerate(z_pool)}
    before = float(((z_base[va] @ protos[:nb].T).argmax(1) == y_base[va]).mean())
    after = float(((z_base[va] @ protos.T).argmax(1) == y_base[va]).mean())
    return {"k": k, "near_sibling": np.mean([acc[c] for c in NEAR_SIBLING]),
            "no_sibling": np.mean([acc[c] for c in NO_SIBLING]), "base_before": before, "base_after": after,
            "base_drop_points": 100 * (before - after)}


@torch.no_grad()
def predict(net, tax: Taxonomy, z: np.ndarray) -> np.ndarray:
    """Top-1 class of each embedding (enrolled classes' score offsets included)."""
    return net.heads(torch.from_numpy(z))["joint"].argmax(1).numpy()


def with_offsets(net, tax: Taxonomy, classes: list[str], calib: tuple, budget: float | None):
    """Give each enrolled class its score offset as ``hier enroll --max-base-drop budget`` does, one
    after another, fitted on the calibration photos (``None``: no offsets, the rule before issue 8)."""
    net.offsets = {} if budget is None else dict.fromkeys(classes, 1e4)   # 1e4: not enrolled yet, so each
    net.set_taxonomy(tax)                                                 # is fitted beside those before it
    if budget is None:
        return net
    z, y = torch.from_numpy(calib[0]), torch.from_numpy(calib[1])
    for c in classes:
        net.offsets[c] = base_drop_offset(net, tax.class_index[c], (z, y), budget)
        net.set_taxonomy(tax)
    return net


def enrollment_protocols(net, base_tax, full_tax, prototypes, held, z_pool, z_test, calib, z_ev, y_ev, k=5,
                         budget: float = MAX_BASE_DROP) -> dict:
    """Issue 8's protocols at k shots with the shipped rule (mapped prototypes, per-class offsets fitted
    on the calibration half of the base validation photos), measured on the other half: the trade-off
    curve over the budget, each class enrolled alone and all 20 at once; and the 20 one after another
    at ``budget`` (base drop after each 5)."""
    mapping_args = (Calibration(0.0), PrototypeMap(net, base_tax, prototypes))
    base_before = float((predict(net, base_tax, z_ev) == y_ev).mean())

    def measure(classes, b):
        enrolled, tax = enroll_all(net, base_tax, full_tax, {c: z_pool[c][:k] for c in classes}, *mapping_args)
        enrolled = with_offsets(enrolled, tax, classes, calib, b)
        acc = {c: float((predict(enrolled, tax, z_test[c]) == tax.class_index[c]).mean()) for c in classes}
        drop = 100 * (base_before - float((predict(enrolled, tax, z_ev) == y_ev).mean()))
        return acc, drop

    def split(acc: dict) -> tuple[float, float]:
        return (float(np.mean([acc[c] for c in NEAR_SIBLING if c in acc])),
                float(np.mean([acc[c] for c in NO_SIBLING if c in acc])))

    curve = []
    for b in (0.0, 0.2, 0.5, 1.0, 2.0, 5.0, None):
        alone = [measure([c], b) for c in held]
        near, other = split({c: acc[c] for c, (acc, _) in zip(held, alone)})
        acc, drop = measure(held, b)
        curve.append({"max_base_drop": "no offset" if b is None else b, "alone: near": near, "alone: other": other,
                      "alone: drop mean": float(np.mean([d for _, d in alone])),
                      "alone: drop max": float(np.max([d for _, d in alone])),
                      "all 20: near": split(acc)[0], "all 20: other": split(acc)[1], "all 20: drop": drop})
    sequential = [{"enrolled": n, "base_drop_points": measure(held[:n], budget)[1]} for n in (5, 10, 15, 20)]
    return {"budget": budget, "base_before": base_before, "curve": curve, "sequential": sequential}


def search_timing(n: int, dim: int, queries: int, seed: int) -> dict:
    """Flat vs IVF on a clustered synthetic gallery: ms per query and IVF Recall@10 against flat."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 100, dim)).astype(np.float32)
    xb = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.integers(0, n, queries)] + 0.05 * rng.normal(size=(queries, dim)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    out = {"vectors": n, "dim": dim, "threads": faiss.omp_get_max_threads()}
    listings = pd.DataFrame({"listing_id": np.arange(n).astype(str)})
    t = time.time()
    flat = Gallery.build(xb, listings, "flat")
    out["flat_build_s"] = time.time() - t
    t = time.time()
    _, truth = flat.search(xq, 10)
    out["flat_ms_per_query"] = 1000 * (time.time() - t) / queries
    del flat
    t = time.time()
    ivf = Gallery.build(xb, listings, "ivf")
    out["ivf"] = factory_string("ivf", n)
    out["ivf_build_s"] = time.time() - t
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        t = time.time()
        _, got = ivf.search(xq, 10)
        out[f"ivf_nprobe{nprobe}_ms_per_query"] = 1000 * (time.time() - t) / queries
        out[f"ivf_nprobe{nprobe}_recall@10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))
    return out


def print_table(console: Console, title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "stanford-cars-dev" / "train")
    ap.add_argument("--taxonomy", type=Path, default=SHARED / "stanford_cars_taxonomy.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_enroll"))
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--model", default=None, help="override the preset's trunk (smoke tests)")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--freeze-stages", type=int, default=None, help="override the preset's frozen trunk stages")
    ap.add_argument("--strengths", default="0,0.5,1", help="TEEN calibration strengths to compare")
    ap.add_argument("--gallery-size", type=int, default=1_000_000, help="0 skips the synthetic search timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    command = " ".join(["python", *sys.argv])
    if not args.data.is_dir():
        raise SystemExit(f"benchmark data not found: {args.data} (needs ../shared)")
    console = Console(width=150)
    full_tax = Taxonomy.from_csv(args.taxonomy)
    held = [*NEAR_SIBLING, *NO_SIBLING]
    pool, test = held_out_split(args.data, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. base model on the 68 other classes (links to the shared photos, nothing copied)
    base_dir = args.out / "base_data"
    if not base_dir.exists():
        base_dir.mkdir()
        for d in args.data.iterdir():
            if d.is_dir() and d.name not in held:
                (base_dir / d.name).symlink_to(d.resolve())
    smoke = dict(trunk=args.model, freeze_stages=0, img_size=args.img_size or 64, pretrained="none",
                 cache_views=0) if args.model else {}
    model_cfg, train_cfg = configs(args.preset, **{**smoke, "seed": args.seed, "epochs": args.epochs,
                                                   **({"freeze_stages": args.freeze_stages}
                                                      if args.freeze_stages is not None else {})})
    base_art = args.out / "base"
    base_train_s = None                     # None: the base artifact of an earlier run was reused
    if not (base_art / "metrics.json").is_file():
        shutil.rmtree(base_art, ignore_errors=True)
        t = time.time()
        train(base_dir, base_art, full_tax, model_cfg, train_cfg)
        base_train_s = time.time() - t
    net, base_tax = artifact.load(base_art)

    # 2. embed everything once: base train/val split as in training, held-out pool and test
    images = scan_folder(base_dir)
    tr, va = split_indices(images.labels, 0.2, args.seed)
    # re-runs (other calibrations) read the forward passes back from the out dir
    z_base, z_pool, z_test = cached_features(args.out / "embeddings.npz", lambda p: Predictor(net)(p)["embedding"],
                                             images.paths, pool, test)
    pretrained = imagenet_features(net, train_cfg.pretrained)
    x_base, x_pool, x_test = cached_features(args.out / "imagenet_features.npz", pretrained, images.paths, pool, test)
    y_base = np.array([base_tax.class_index[c] for c in images.labels])
    results = {"base_train_s": base_train_s}
    base_before = float((predict(net, base_tax, z_base[va]) == y_base[va]).mean())
    results["base_acc_before"] = base_before
    # what `hier train` saves as prototypes.npy: mean embedding of each base class's training photos
    prototypes = class_means(z_base[tr], y_base[tr], len(base_tax))
    mapping = PrototypeMap(net, base_tax, prototypes)
    variants = [("raw", 0.0, None)] + [("map", float(x), mapping) for x in args.strengths.split(",")]
    rows = []
    for k in (1, 5, 10):
        for frame, strength, m in variants:
            enrolled, tax = enroll_all(net, base_tax, full_tax, {c: z_pool[c][:k] for c in held},
                                       Calibration(strength), m)
            acc = {c: float((predict(enrolled, tax, z_test[c]) == tax.class_index[c]).mean()) for c in held}
            base_after = float((predict(enrolled, tax, z_base[va]) == y_base[va]).mean())
            rows.append({"k": k, "prototype": frame, "teen": strength,
                         "near_sibling": np.mean([acc[c] for c in NEAR_SIBLING]),
                         "no_sibling": np.mean([acc[c] for c in NO_SIBLING]),
                         "all_held_out": np.mean(list(acc.values())),
                         "base_before": base_before, "base_after": base_after,
                         "base_drop_points": 100 * (base_before - base_after)})
    results["enroll"] = rows
    # offsets are fitted on half of the base validation photos and measured on the other half
    half = np.random.default_rng(args.seed + 1).permutation(len(va))
    cal, ev = va[half[: len(va) // 2]], va[half[len(va) // 2:]]
    results["protocols_5shot"] = enrollment_protocols(net, base_tax, full_tax, prototypes, held, z_pool, z_test,
                                                      (z_base[cal], y_base[cal]), z_base[ev], y_base[ev])
    results["nearest_prototype"] = [
        {"features": name, **nearest_prototype(zb, y_base, tr, va, zp, zt, k)}
        for name, zb, zp, zt in (("imagenet frozen", x_base, x_pool, x_test),
                                 ("hier embedding", z_base, z_pool, z_test))
        for k in (1, 5, 10)]

    # 3. upper bound: a head retrained on all 88 classes with the same embeddings (10 shots per new class)
    names = base_tax.classes + held
    x_fit = np.concatenate([z_base[tr]] + [z_pool[c] for c in held])
    y_fit = np.concatenate([y_base[tr]] + [np.full(POOL, names.index(c)) for c in held])
    t = time.time()
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x_fit, y_fit)
    retrain_s = time.time() - t
    near_ub = np.mean([(clf.predict(z_test[c]) == names.index(c)).mean() for c in NEAR_SIBLING])
    other_ub = np.mean([(clf.predict(z_test[c]) == names.index(c)).mean() for c in NO_SIBLING])
    results["retrain_upper_bound"] = {"near_sibling": near_ub, "no_sibling": other_ub,
                                      "base": float((clf.predict(z_base[va]) == y_base[va]).mean()),
                                      "retrain_s": retrain_s}

    # 4. real `enroll` on a copy of the artifact: time per class beyond embedding its shots
    with tempfile.TemporaryDirectory() as tmp:
        copy_art = Path(tmp) / "art"
        shutil.copytree(base_art, copy_art)
        artifact.save_npy(copy_art / PROTOTYPES, prototypes)
        save_validation(copy_art / VALIDATION, z_base[va], y_base[va])       # as `hier train` now writes
        times = []
        for c in held[:5]:
            t = time.time()
            Predictor(net)(pool[c][:5])
            embed_t = time.time() - t
            t = time.time()
            enroll(copy_art, c, pool[c][:5])
            times.append((time.time() - t, embed_t))
        results["enroll_cli_s_per_class"] = float(np.mean([a for a, _ in times]))
        results["enroll_s_beyond_embedding"] = float(np.mean([a - b for a, b in times]))

    # 5. retrieval: gallery = base train photos + the 10 pool photos of each held-out class
    gal_z = np.concatenate([z_base[tr]] + [z_pool[c] for c in held])
    gal_cls = [images.labels[i] for i in tr] + [c for c in held for _ in range(POOL)]
    gallery = Gallery.build(gal_z, pd.DataFrame({"listing_id": map(str, range(len(gal_z))), "class": gal_cls}))
    hits1, hits5 = [], []
    for c in held:
        _, ids = gallery.search(z_test[c], 5)
        got = [[gal_cls[i] for i in row] for row in ids]
        hits1 += [g[0] == c for g in got]
        hits5 += [c in g for g in got]
    results["retrieval_held_out"] = {"recall@1": float(np.mean(hits1)), "recall@5": float(np.mean(hits5))}

    # 6. search latency on a synthetic 1M x 256 gallery
    results["search_1m"] = search_timing(args.gallery_size, 256, 200, args.seed) if args.gallery_size else {}

    print_table(console, "Enrollment on held-out Stanford dev classes, no score offsets (5-shot goal: near >= 0.60, "
                         "other >= 0.70, base drop <= 1 point)", rows)
    print_table(console, "Nearest prototype over all 88 classes, no head: how well the features alone separate "
                         "unseen classes", results["nearest_prototype"])
    protocols = results["protocols_5shot"]
    print_table(console, "5 shots: --max-base-drop vs new-class accuracy and measured base drop (points, on held-out "
                         "base photos not used to fit the offsets), each class enrolled alone (means over the 20) "
                         "and all 20 at once", protocols["curve"])
    print_table(console, f"5 shots at --max-base-drop {protocols['budget']}, enrolled one after another: base drop "
                         "after each 5", protocols["sequential"])
    console.print_json(json.dumps({k: v for k, v in results.items()
                                   if k not in ("enroll", "nearest_prototype", "protocols_5shot")}, default=float))
    (args.out / "bench_enroll.json").write_text(json.dumps(results, indent=2, default=float))
    console.print(f"command: {command}")


if __name__ == "__main__":
    main()
