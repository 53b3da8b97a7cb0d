"""Prediction speed, side by side in one run: a plain PyTorch loop, the model's pure forward, and
`hier predict` as a whole command (start-up included) eager, with its defaults (ONNX Runtime, decoding
workers beside the network), on OpenVINO (when installed) and on the int8 export (when the artifact
has one, or ``--int8`` writes it: needs a trained artifact); on the
dev photos and on full-size 1600 x 1200 JPEGs made from them (written outside the repo).

    python scripts/bench_speed.py --out /tmp/bench_speed

The artifact is the offline ImageNet efficientnet_lite0 trunk with fresh heads over the 88 dev classes,
224 px, TTA off: speed does not depend on training (``--artifact`` takes a trained one). Also printed: the largest difference between the
ONNX and the eager probabilities, and what reduced-size JPEG decoding changes on the full-size photos.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from benchlib import machine
from PIL import Image
from rich.console import Console
from rich.table import Table

from hier import artifact
from hier.export.auto import artifact_predictor
from hier.export.int8 import compare, export_int8, split_photos
from hier.export.onnx import export
from hier.models import HierNet, ModelConfig, load_offline_weights
from hier.runtime import Predictor
from hier.runtime.backend import export_is_fresh, has_openvino
from hier.taxonomy import Taxonomy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class PlainDataset(torch.utils.data.Dataset):
    """The loop a user writes first: PIL decode, resize, to tensor, normalise."""

    def __init__(self, paths):
        self.paths = paths
        self.mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        self.std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        im = Image.open(self.paths[i]).convert("RGB").resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std


@torch.no_grad()
def plain_loop(paths) -> float:
    model = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    t = time.time()
    for x in torch.utils.data.DataLoader(PlainDataset(paths), batch_size=32):
        model(x).softmax(1)
    return len(paths) / (time.time() - t)


@torch.no_grad()
def pure_forward(n: int) -> float:
    model = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    x = torch.randn(32, 3, 224, 224)
    model(x)
    t = time.time()
    for _ in range(0, n, 32):
        model(x)
    return n / (time.time() - t)


def hier_predict(art: Path, folder: Path, backend: str, out: Path, *flags: str) -> float:
    """`hier predict` as a user runs it, in a fresh process: start-up, reading, decoding, writing."""
    out.unlink(missing_ok=True)                  # hier predict refuses to overwrite a file
    t = time.time()
    subprocess.run([sys.executable, "-m", "hier", "predict", str(art), str(folder), "--topk", "1", "--format", "csv",
                    "--out", str(out), *(["--backend", backend] if backend else []), *flags], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return len(list(folder.iterdir())) / (time.time() - t)


def make_artifact(path: Path, taxonomy: Taxonomy) -> None:
    if (path / artifact.CONFIG).is_file():
        return
    torch.manual_seed(0)
    net = HierNet(ModelConfig(tta=False), taxonomy)
    load_offline_weights(net.trunk)
    artifact.save(path, net, taxonomy)


def photo_sets(out: Path, n: int) -> dict[str, Path]:
    dev = sorted((SHARED / "stanford-cars-dev" / "train").glob("*/*.jpg"))[::4][:n]
    sets = {"dev photos": out / "dev", "1600x1200 JPEGs": out / "full"}
    if not sets["dev photos"].is_dir():
        sets["dev photos"].mkdir(parents=True)
        sets["1600x1200 JPEGs"].mkdir(parents=True)
        for i, p in enumerate(dev):
            (sets["dev photos"] / f"{i:04d}.jpg").symlink_to(p.resolve())
            Image.open(p).convert("RGB").resize((1600, 1200), Image.BICUBIC).save(
                sets["1600x1200 JPEGs"] / f"{i:04d}.jpg", quality=90)
        (out / "labels.json").write_text(json.dumps({f"{i:04d}.jpg": p.parent.name for i, p in enumerate(dev)}))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_speed"))
    ap.add_argument("--photos", type=int, default=725)
    ap.add_argument("--artifact", type=Path, default=None,
                    help="a trained artifact (exported in place) instead of fresh heads: the draft-decoding "
                         "check then compares trained answers")
    ap.add_argument("--int8", action="store_true", help="write the artifact's int8 export first if it has none")
    args = ap.parse_args()
    start_load = os.getloadavg()
    torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    taxonomy = Taxonomy.from_csv(SHARED / "stanford_cars_taxonomy.csv")
    art = args.artifact or args.out / "artifact"
    make_artifact(art, taxonomy)
    export(art)
    net, tax = artifact.load(art)
    if args.int8 and not export_is_fresh(art, net, "int8"):
        export_int8(art)
    extra = (["openvino"] if has_openvino() else []) + (["onnx-int8"] if export_is_fresh(art, net, "int8") else [])
    sets = photo_sets(args.out, args.photos)
    rows, checks = [], {}
    forward = pure_forward(args.photos)
    for name, folder in sets.items():
        paths = sorted(folder.iterdir())
        plain = plain_loop(paths)
        eager = hier_predict(art, folder, "torch", args.out / "eager.csv")
        fast = hier_predict(art, folder, None, args.out / "defaults.csv")      # ONNX Runtime + decode workers
        row = {"photos": name, "n": len(paths), "plain loop img/s": plain, "pure forward img/s": forward,
               "hier predict eager img/s": eager, "hier predict (defaults) img/s": fast, "defaults / plain": fast / plain}
        for b in extra:                      # same photos, threads and decode workers; only the backend differs
            row[f"{b} img/s"] = hier_predict(art, folder, b, args.out / f"{b}.csv")
            row[f"{b} / plain"] = row[f"{b} img/s"] / plain
        if net.cfg.tta:                      # the defaults without the mirror images: one view a photo
            row["defaults --no-tta img/s"] = hier_predict(art, folder, None, args.out / "no_tta.csv", "--no-tta")
            row["--no-tta / plain"] = row["defaults --no-tta img/s"] / plain
        rows.append(row)
        check = paths if args.artifact else paths[:128]      # a trained artifact: its accuracy on all of them
        p_eager = Predictor(net)(check)["probs"]
        p_onnx = artifact_predictor(art, net, "onnx")(check)["probs"]
        checks[name] = {"max |p_onnx - p_eager|": float(np.abs(p_onnx - p_eager).max())}
        for b in extra:
            p_b = artifact_predictor(art, net, b)(check)["probs"]
            checks[name][f"max |p_{b} - p_eager|"] = float(np.abs(p_b - p_eager).max())
            checks[name][f"top-1 agreement {b} vs eager"] = float((p_b.argmax(1) == p_eager.argmax(1)).mean())
        if name.startswith("1600"):          # reduced-size decoding against full decoding, same model
            full = Predictor(net)
            full_probs = []
            for p in check:
                with Image.open(p) as im:
                    full_probs.append(full([np.asarray(im.convert("RGB"))])["probs"][0])
            full_probs = np.stack(full_probs)
            checks[name]["max |p_draft - p_full_decode|"] = float(np.abs(p_eager - full_probs).max())
            checks[name]["top-1 agreement draft vs full"] = float((p_eager.argmax(1) == full_probs.argmax(1)).mean())
            labels = json.loads((args.out / "labels.json").read_text())
            known = [i for i, p in enumerate(check) if labels[p.name] in tax]
            if known:                        # a trained artifact: accuracy either way, on the classes it knows
                y = np.array([tax.class_index[labels[check[i].name]] for i in known])
                checks[name]["top-1 draft decode"] = float((p_eager[known].argmax(1) == y).mean())
                checks[name]["top-1 full decode"] = float((full_probs[known].argmax(1) == y).mean())
                checks[name]["photos with a known class"] = len(known)
    tta = net.cfg.tta
    if tta and args.artifact:                # what --no-tta costs, on the artifact's own validation photos
        _, val, labels = split_photos(art, None, tax)
        y = np.array([tax.class_index[c] for c in labels])
        checks["--no-tta against TTA, validation photos"] = compare(
            artifact_predictor(art, net), artifact_predictor(art, net, tta=False), val, y, tax)
    table = Table(title=f"Prediction speed, {torch.get_num_threads()} threads, 224 px, hier TTA {'on' if tta else 'off'}, "
                        "batch 64 (hier) / 32 (plain)")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console(width=160).print(table)
    print(json.dumps(checks, indent=2))
    info = {**machine(), "loadavg_at_start": [round(x, 2) for x in start_load]}     # a shared machine
    print(json.dumps(info))
    (args.out / "bench_speed.json").write_text(json.dumps({"rows": rows, "checks": checks, "machine": info}, indent=2))


if __name__ == "__main__":
    main()
