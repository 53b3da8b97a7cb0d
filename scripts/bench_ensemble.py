"""Ensemble benchmark on ../shared/data/stanford-cars-dev (88 real Stanford Cars classes).

Holds out a stratified 20 % test split (seed 0), trains ``--folds`` folds of one fast configuration on
the other 80 % (``--fold i --folds K``) and one single model of the same flags on the whole 80 %
(20 % of it for validation), builds ``hier ensemble`` of the folds, and evaluates every fold model,
the single model and the ensemble on the held-out photos: top-1, log loss, ECE and seconds. The splits
are symlink folders inside ``--out`` (no photo copied); nothing is cached, so ``--out`` must be new.

    python scripts/bench_ensemble.py --out runs/bench_ensemble                 # the benchmark (long)
    python scripts/bench_ensemble.py --out /tmp/be --classes 4 --epochs 1 --img-size 64   # a check
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchlib import machine
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import train_test_split

from hier.data import scan_folder
from hier.recognizer import Recognizer
from hier.services.ensemble.build import build
from hier.taxonomy import Taxonomy
from hier.training.config import configs
from hier.training.run import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def link_split(data: Path, out: Path, classes: int | None, test_frac: float, seed: int) -> tuple[Path, Path, list[str]]:
    """out/train and out/test: symlinks to the photos of the first ``classes`` classes, split stratified."""
    images = scan_folder(data)
    names = sorted(set(images.labels))[:classes]
    keep = [i for i, c in enumerate(images.labels) if c in set(names)]
    labels = [images.labels[i] for i in keep]
    train_idx, test_idx = train_test_split(keep, test_size=test_frac, stratify=labels, random_state=seed)
    for part, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            src = Path(images.paths[i]).resolve()
            dst = out / part / images.labels[i] / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, dst)
    return out / "train", out / "test", names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "stanford-cars-dev" / "train")
    ap.add_argument("--taxonomy", type=Path, default=SHARED / "stanford_cars_taxonomy.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_ensemble"))
    ap.add_argument("--classes", type=int, default=None, help="only the first N classes (a quick check)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="cpu-max")
    ap.add_argument("--img-size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"benchmark data not found: {args.data} (needs ../shared)")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty: the benchmark caches nothing, give a new folder")
    print(json.dumps(machine()))
    train_dir, test_dir, names = link_split(args.data, args.out, args.classes, args.test_frac, args.seed)
    taxonomy = Taxonomy.from_csv(args.taxonomy).subset(names)
    flags = dict(img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    print(f"{len(names)} classes; train {sum(1 for _ in train_dir.glob('*/*'))} photos, "
          f"test {sum(1 for _ in test_dir.glob('*/*'))} photos")

    rows, runs = {}, {}
    for i in range(args.folds):
        t = time.time()
        train(train_dir, args.out / f"fold{i}", taxonomy, *configs(args.preset, fold=i, folds=args.folds, **flags))
        runs[f"fold {i}/{args.folds}"] = (args.out / f"fold{i}", time.time() - t)
    t = time.time()
    train(train_dir, args.out / "single", taxonomy, *configs(args.preset, val_frac=0.2, **flags))
    runs["single (80 % of train, val 20 %)"] = (args.out / "single", time.time() - t)
    t = time.time()
    spec = build([args.out / f"fold{i}" for i in range(args.folds)], args.out / "ensemble")
    runs[f"ensemble of the {args.folds} folds"] = (args.out / "ensemble", time.time() - t)

    for name, (path, train_s) in runs.items():
        t = time.time()
        m = Recognizer(path).evaluate(test_dir)
        rows[name] = {**{k: m[k] for k in ("images", "top1", "log_loss", "ece", "brand_acc")},
                      "train_s": round(train_s, 1), "evaluate_s": round(time.time() - t, 1)}

    table = Table(title=f"Stanford dev, {len(names)} classes, held-out {args.test_frac:.0%} (seed {args.seed}); "
                        f"--preset {args.preset} --img-size {args.img_size} --epochs {args.epochs}")
    cols = ["images", "top1", "brand_acc", "log_loss", "ece", "train_s", "evaluate_s"]
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[f"{r[c]:.4f}" if isinstance(r[c], float) and c not in ("train_s", "evaluate_s")
                              else str(r[c]) for c in cols])
    Console(width=160).print(table)
    print(f"ensemble temperature {spec['temperature']:.3f}; OOF log loss {spec['oof']['log_loss']:.4f} "
          f"on {spec['oof']['images']} photos ({spec['fitted']})")
    result = {"machine": machine(), "rows": rows, "ensemble": spec}
    print(json.dumps(result["machine"]))
    (args.out / "bench_ensemble.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
