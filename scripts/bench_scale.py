"""Beyond one process, measured on this machine: `hier embed`'s peak memory as the number of photos
grows, and training throughput on 1 and 2 processes (torchrun, gloo).

    python scripts/bench_scale.py --out /tmp/bench_scale [--photos 1000 10000] [--skip-ddp]

Embedding: the dev photos linked (never copied into the repo) under OUT as N listings (repeats get
their own names), embedded by an artifact of the offline ImageNet efficientnet_lite0 trunk with fresh
heads over the 88 dev classes (speed and memory do not depend on training), 128 px, TTA off, ONNX
Runtime; each `hier embed` in a fresh process, its peak RSS read from the kernel (``ru_maxrss`` of the
waited child). Training: the same dev photos, efficientnet_lite0 at 128 px with the first 3 stages
frozen (no cache: every step decodes and runs the trunk), one epoch, global batch 32, timed from
the log's ``seconds`` column; 1 process with 2 threads against torchrun's 2 processes of 1 thread.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import machine

from hier import artifact
from hier.artifact.files import LOG
from hier.export.onnx import export
from hier.models import HierNet, ModelConfig, load_offline_weights
from hier.taxonomy import Taxonomy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEV = SHARED / "stanford-cars-dev" / "train"


def make_artifact(path: Path, taxonomy: Taxonomy, img_size: int) -> None:
    if (path / artifact.CONFIG).is_file():
        return
    torch.manual_seed(0)
    net = HierNet(ModelConfig(tta=False, img_size=img_size), taxonomy)
    load_offline_weights(net.trunk)
    artifact.save(path, net, taxonomy)
    export(path)


def listing_folder(out: Path, n: int) -> Path:
    folder = out / f"listings-{n}"
    photos = sorted(DEV.glob("*/*.jpg"))
    if not folder.is_dir():
        tmp = out / f".listings-{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(n):
            (tmp / f"{i:06d}.jpg").symlink_to(photos[i % len(photos)].resolve())
        tmp.rename(folder)
    return folder


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a command run in a fresh process."""
    t = time.time()
    pid = os.posix_spawn(cmd[0], cmd, os.environ)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.time() - t, usage.ru_maxrss / 1024


def train_epoch_seconds(out: Path, nproc: int, img_size: int) -> float:
    run = out / f"train-{nproc}"
    shutil.rmtree(run, ignore_errors=True)
    flags = ["--pretrained", "efficientnet_lite0", "--img-size", str(img_size), "--freeze-stages", "3",
             "--epochs", "1", "--batch-size", "32", "--no-tta", "--no-export", "--val-frac", "0.1"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "hier"] \
        if nproc > 1 else [sys.executable, "-m", "hier"]
    subprocess.run([*launch, "train", str(DEV), "--out", str(run), *flags], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with (run / LOG).open(encoding="utf-8") as f:
        return float(next(csv.DictReader(f))["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--photos", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--skip-ddp", action="store_true")
    args = ap.parse_args()
    if not DEV.is_dir():
        raise SystemExit(f"the dev photos are not at {DEV}")
    args.out.mkdir(parents=True, exist_ok=True)
    art = args.out / f"artifact-{args.img_size}"
    make_artifact(art, Taxonomy.from_csv(SHARED / "stanford_cars_taxonomy.csv"), args.img_size)
    results = {"machine": machine(), "embed": [], "train": []}
    for n in args.photos:
        folder = listing_folder(args.out, n)
        shards = args.out / f"emb-{n}"
        shutil.rmtree(shards, ignore_errors=True)
        seconds, peak = peak_rss_of([sys.executable, "-m", "hier", "embed", str(art), str(folder), "--out", str(shards)])
        row = {"photos": n, "seconds": round(seconds, 1), "photos/s": round(n / seconds, 1), "peak RSS MiB": round(peak)}
        results["embed"].append(row)
        print("embed", row, flush=True)
    if not args.skip_ddp:
        for nproc in (1, 2):
            s = train_epoch_seconds(args.out, nproc, args.img_size)
            row = {"processes": nproc, "epoch seconds": s}
            results["train"].append(row)
            print("train", row, flush=True)
        one, two = (r["epoch seconds"] for r in results["train"])
        results["ddp speed-up"] = round(one / two, 2)
    results["machine_after"] = machine()["loadavg"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
