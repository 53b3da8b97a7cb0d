"""The competitors' recipe, one lever at a time, on ../shared/data/stanford-cars-dev (88 real classes).

Every lever is trained alone on top of the same base settings (a short, fast configuration of the
default trunk, so a dozen runs fit in an hour on 2 cores) and the same stratified 80/20 split; the
table gives dev-split top-1, log loss, ECE and seconds after temperature scaling, as the artifact
reports them. The base is a proxy: a lever that needs long training (CutMix, SWA) is judged at this
length, and the winners are then checked together in a full-length preset (docs/benchmarks/recipe.md).

    python scripts/bench_recipe.py --out /tmp/bench_recipe
    python scripts/bench_recipe.py --out /tmp/bench_recipe --levers base,cutmix --base-epochs 6
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchlib import machine
from rich.console import Console
from rich.table import Table

from hier.taxonomy import Taxonomy
from hier.training.config import configs
from hier.training.run import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# each lever alone, as `hier train` flags on top of the base
LEVERS: dict[str, dict] = {
    "base": {},
    "aug seed": {"aug": "seed"},
    "aug randaug": {"aug": "randaug"},
    "mixup 0.2": {"mixup": 0.2},
    "cutmix 1.0": {"cutmix": 1.0},
    "loss focal": {"loss": "focal"},
    "loss poly1": {"loss": "poly1"},
    "loss penalty": {"loss": "penalty"},
    "swa last half": {"swa_epochs": "half"},
    "layer decay 0.85": {"layer_decay": 0.85},
    "low-res 2/3 of epochs": {"low_res": "two-thirds", "low_res_epochs": "two-thirds"},
}


def lever_flags(lever: dict, epochs: int, img_size: int) -> dict:
    """Levers whose values depend on the base's length and size (SWA over the last half of the epochs,
    progressive resizing at 3/4 of the size for the first 2/3 of them)."""
    flags = dict(lever)
    if flags.get("swa_epochs") == "half":
        flags["swa_epochs"] = max(1, epochs // 2)
    if flags.get("low_res") == "two-thirds":
        flags["low_res"], flags["low_res_epochs"] = round(img_size * 0.75 / 32) * 32, max(1, 2 * epochs // 3)
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "stanford-cars-dev" / "train")
    ap.add_argument("--taxonomy", type=Path, default=SHARED / "stanford_cars_taxonomy.csv")
    ap.add_argument("--out", type=Path, required=True, help="a new or empty folder for the runs")
    ap.add_argument("--preset", default="cpu-max")
    ap.add_argument("--base-epochs", type=int, default=4)
    ap.add_argument("--base-size", type=int, default=160)
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated subset of: {', '.join(LEVERS)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"benchmark data not found: {args.data} (needs ../shared)")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: give a new folder (nothing here is reused)")
    names = [n.strip() for n in args.levers.split(",")]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever {unknown[0]!r}; choose from: {', '.join(LEVERS)}")
    taxonomy = Taxonomy.from_csv(args.taxonomy)
    print(json.dumps(machine()))
    rows = {}
    for name in names:
        flags = lever_flags(LEVERS[name], args.base_epochs, args.base_size)
        model_cfg, train_cfg = configs(args.preset, seed=args.seed, val_frac=0.2, epochs=args.base_epochs,
                                       img_size=args.base_size, **flags)
        t = time.time()
        metrics = train(args.data, args.out / name.replace(" ", "_").replace("/", "-"), taxonomy, model_cfg, train_cfg)
        rows[name] = {**{k: metrics[k] for k in ("top1", "model_acc", "brand_acc", "log_loss", "ece", "top5")},
                      "best_epoch": metrics.get("best_epoch"), "seconds": round(time.time() - t),
                      "flags": flags, "loadavg": machine()["loadavg"]}
        print(json.dumps({name: rows[name]}), flush=True)
        (args.out / "bench_recipe.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))

    base = rows.get("base")
    table = Table(title=f"Stanford dev, 88 classes, 80/20 split (seed {args.seed}); base: --preset {args.preset} "
                        f"--img-size {args.base_size} --epochs {args.base_epochs}; {torch.get_num_threads()} threads")
    for c in ("lever", "top-1", "Δ top-1", "log loss", "Δ log loss", "ECE", "seconds", "load"):
        table.add_column(c, justify="left" if c == "lever" else "right")
    for name, m in rows.items():
        d1 = f"{m['top1'] - base['top1']:+.3f}" if base else "-"
        d2 = f"{m['log_loss'] - base['log_loss']:+.3f}" if base else "-"
        table.add_row(name, f"{m['top1']:.3f}", d1, f"{m['log_loss']:.3f}", d2, f"{m['ece']:.3f}", str(m["seconds"]),
                      f"{m['loadavg'][0]:.1f}")
    Console().print(table)
    print(json.dumps(machine()))


if __name__ == "__main__":
    main()
