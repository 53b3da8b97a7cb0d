"""Training benchmark on ../shared/data/stanford-cars-dev (88 real Stanford Cars classes).

Trains hier (``--preset cpu`` by default) on a stratified 80/20 split and compares it with a
frozen-trunk baseline on the same split: ImageNet efficientnet_lite0 pooled features + scikit-learn
logistic regression. Prints fine/model/brand top-1, log loss and ECE for both, and the wall time.

    python scripts/bench_train.py --out runs/bench_train
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import machine
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression

from hier.data import ImageDataset, eval_transform, loader, scan_folder, split_indices
from hier.metrics import evaluate_probs
from hier.models import create_trunk
from hier.taxonomy import Taxonomy
from hier.training.config import configs
from hier.training.run import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@torch.no_grad()
def pooled_features(paths, img_size: int) -> np.ndarray:
    trunk = create_trunk("efficientnet_lite0", "efficientnet_lite0").eval()
    return np.concatenate([trunk(x).numpy() for x, _ in loader(ImageDataset(paths, None, eval_transform(img_size)), 64)])


def frozen_baseline(data: Path, taxonomy: Taxonomy, img_size: int, seed: int) -> dict:
    images = scan_folder(data)
    taxonomy = taxonomy.subset([c for c in taxonomy.classes if c in set(images.labels)])
    y = np.array([taxonomy.class_index[c] for c in images.labels])
    tr, va = split_indices(images.labels, 0.2, seed)
    feats = pooled_features(images.paths, img_size)
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(feats[tr], y[tr])
    probs = np.zeros((len(va), len(taxonomy)))
    probs[:, clf.classes_] = clf.predict_proba(feats[va])
    return evaluate_probs(probs, y[va], taxonomy)


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where it parses (numbers, true/false) and as text otherwise."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--set takes KEY=VALUE, not {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "stanford-cars-dev" / "train")
    ap.add_argument("--taxonomy", type=Path, default=SHARED / "stanford_cars_taxonomy.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_train"))
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--freeze-stages", type=int, default=None, help="override the preset's frozen trunk stages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="further training settings over the preset, e.g. low_res=160 low_res_epochs=14")
    args = ap.parse_args()
    command = " ".join(["python", *sys.argv])
    if not args.data.is_dir():
        raise SystemExit(f"benchmark data not found: {args.data} (needs ../shared)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    taxonomy = Taxonomy.from_csv(args.taxonomy)
    extra = dict(setting(s) for s in args.set)
    model_cfg, train_cfg = configs(args.preset, seed=args.seed, val_frac=0.2, epochs=args.epochs,
                                   freeze_stages=args.freeze_stages, **extra)
    name = f"hier --preset {args.preset}" + (f" --freeze-stages {args.freeze_stages}"
                                             if args.freeze_stages is not None else "") \
        + "".join(f" {k}={v}" for k, v in extra.items())

    rows = {}
    t0 = time.time()
    if not args.skip_baseline:
        rows["frozen lite0 + logistic regression"] = frozen_baseline(args.data, taxonomy, model_cfg.img_size,
                                                                     args.seed)
        rows["frozen lite0 + logistic regression"]["seconds"] = time.time() - t0
    t1 = time.time()
    rows[name] = train(args.data, args.out, taxonomy, model_cfg, train_cfg)
    rows[name]["seconds"] = time.time() - t1

    table = Table(title=f"Stanford dev, 88 classes, stratified 80/20 split (seed {args.seed}), "
                        f"{torch.get_num_threads()} threads")
    cols = ["top1", "model_acc", "brand_acc", "log_loss", "log_loss_before_temperature", "ece", "top5",
            "trained_head_top1", "trained_head_log_loss", "statistics_s", "seconds"]
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *[f"{m[c]:.3f}" if c in m else "-" for c in cols])
    Console().print(table)
    print(f"total wall time {time.time() - t0:.0f} s")
    print(f"command: {command}")
    print(json.dumps(machine()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_train.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
