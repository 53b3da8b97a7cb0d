"""What YOLO car crops do to accuracy: on the demo's drawn photos (a small car on a cluttered
background) and, with ``--dev-artifact``, on the Stanford dev photos (already cut to the car).

    python scripts/bench_crop.py --out /tmp/bench_crop [--dev-artifact runs/bench_enroll/base]

Demo: one model trained on the full photos and one trained with ``--crop yolo``, both evaluated on
freshly drawn photos with and without crops. Dev: a trained artifact evaluated on its own validation
split (the seeded 80/20 split of the classes it knows) with and without crops. Prints top-1, log loss
and the detector's fallback rate (photos without a vehicle box, used whole).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from hier import Recognizer
from hier.artifact.files import METRICS
from hier.data import scan_folder, split_indices
from hier.data.demo import make_demo_dataset
from hier.data.detect import CarDetector
from hier.metrics import evaluate_probs

SHARED = Path(__file__).resolve().parents[2] / "shared"
DETECTOR = SHARED / "models" / "yolov8n_int8.tflite"


def scores(rec: Recognizer, paths, labels) -> dict:
    out, snap = rec._embed(paths)
    tax = snap.taxonomy
    y = np.array([tax.class_index[c] for c in labels])
    m = evaluate_probs(out["probs"], y, tax)
    return {"top1": m["top1"], "log_loss": m["log_loss"], "brand_acc": m["brand_acc"],
            "fallback": rec.crop_fallback if rec.detector is not None else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_crop"))
    ap.add_argument("--detector", type=Path, default=DETECTOR)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--dev-artifact", type=Path, default=None)
    args = ap.parse_args()
    detector = CarDetector(args.detector)
    rows = []
    demo = args.out / "demo"
    if not demo.exists():
        make_demo_dataset(demo / "data", images_per_class=40, img_size=128)
        make_demo_dataset(demo / "eval", images_per_class=10, test_images_per_class=0, img_size=128, seed=1)
    held = scan_folder(demo / "eval" / "train")
    flags = dict(taxonomy=demo / "data" / "taxonomy.csv", img_size=128, freeze_stages=3, epochs=args.epochs,
                 cache_views=2, ema=False)
    for trained_on, extra in (("full photos", {}), ("yolo crops", {"crop": "yolo", "detector": str(args.detector)})):
        out = demo / trained_on.replace(" ", "_")
        t = time.time()
        if not (out / METRICS).is_file():
            Recognizer.train(demo / "data" / "train", out, **flags, **extra)
        for evaluated_on, det in (("full photos", None), ("yolo crops", detector)):
            rec = Recognizer(out, detector=det)
            rows.append({"data": "demo (drawn, uncropped)", "trained on": trained_on, "evaluated on": evaluated_on,
                         **scores(rec, held.paths, held.labels), "seconds": time.time() - t})
    if args.dev_artifact:
        dev = scan_folder(SHARED / "data" / "stanford-cars-dev" / "train")
        known = Recognizer(args.dev_artifact).taxonomy
        keep = [i for i, c in enumerate(dev.labels) if c in known]
        labels = [dev.labels[i] for i in keep]
        _, va = split_indices(labels, 0.2, 0)
        paths, labels = [dev.paths[keep[i]] for i in va], [labels[i] for i in va]
        for evaluated_on, det in (("full photos", None), ("yolo crops", detector)):
            rows.append({"data": f"Stanford dev val ({len(paths)} photos)", "trained on": "full photos",
                         "evaluated on": evaluated_on,
                         **scores(Recognizer(args.dev_artifact, detector=det), paths, labels), "seconds": None})
    table = Table(title="YOLO car crops (yolov8n int8 TFLite, largest car/bus/truck box + 8%)")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*["-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console(width=160).print(table)
    print("command: python scripts/bench_crop.py --out", args.out,
          *(["--dev-artifact", str(args.dev_artifact)] if args.dev_artifact else []))
    (args.out / "bench_crop.json").write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
