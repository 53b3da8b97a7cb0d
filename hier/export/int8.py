"""``hier export --int8``: static int8 quantisation of the ONNX export, calibrated on the artifact's own
training photos (split as ``hier train`` split them) and measured against fp32 on its validation photos."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from hier import artifact, fileio
from hier.artifact.files import INT8
from hier.artifact.records import read_run
from hier.data import ImageDataset, eval_transform, loader
from hier.data.split import SplitSettings, training_split
from hier.errors import HierError
from hier.export.onnx import export
from hier.metrics import evaluate_probs
from hier.runtime import Predictor
from hier.runtime.backend import export_is_fresh

CALIBRATION_PHOTOS = 256          # training photos the int8 activation ranges are calibrated on
INT8_TOLERANCE = 0.003            # top-1 change past which ``hier export --int8`` says so


def float_nodes(model, keep: tuple[str, ...] = ("stem", "head")) -> list[str]:
    """Names of the nodes int8 leaves in float: ``stem``, the first convolution (raw pixels in, where
    8 bits lose most; each view's, in an older two-view export); ``head``, every node after the last
    convolution (pooling, the embedding projection, the L2 normalisation); ``last-conv``, the last
    convolution too; ``depthwise``, every grouped convolution. Read from the graph, so it holds for any
    trunk."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reach(start, step) -> set[str]:
        seen, todo = set(), list(start)
        while todo:
            n = todo.pop()
            for m in step(n):
                if m.name not in seen:
                    seen.add(m.name)
                    todo.append(m)
        return seen
    up = lambda n: [producer[i] for i in n.input if i in producer]                    # noqa: E731
    down = lambda n: [m for o in n.output for m in consumers.get(o, [])]             # noqa: E731
    convs = [n for n in nodes if n.op_type == "Conv"]
    conv_names = {n.name for n in convs}
    out = set()
    if "stem" in keep:
        out |= {n.name for n in convs if not reach([n], up) & conv_names}
    last = [n for n in convs if not reach([n], down) & conv_names]
    if "head" in keep:
        out |= reach(last, down)
    if "last-conv" in keep:
        out |= {n.name for n in last}
    if "depthwise" in keep:
        out |= {n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)}
    return sorted(out)


def split_photos(path: Path, data: Path | None, taxonomy) -> tuple[list, list, list[str]]:
    """(training photos, validation photos, validation labels) of ``data`` (default: the data the
    artifact was trained on, from train.json), split by ``hier.data.split.training_split`` with the
    run's settings: the same layout, exclusions, merged classes, car crops and split (another folder:
    its own photos, the same rule, no exclude list)."""
    run = read_run(path)
    own = data is None
    data = Path(data or run.get("data") or "")
    if not str(data) or not data.is_dir():
        raise HierError(f"--int8 calibrates on photos: the training data {str(data) or '(none in train.json)'} "
                        "is not a folder here; pass --data DIR (labelled photos of the artifact's classes)")
    split = training_split(data, taxonomy, SplitSettings.of(run.get("train", {}), run), own_data=own)
    if len(split.val) == 0:
        raise HierError(f"{data}: no validation photos (val_frac 0) to measure what int8 changes on")
    (train, _), (val, labels) = split.part("train"), split.part("val")
    return train, val, labels


class _Calibration:
    """onnxruntime.quantization's ``CalibrationDataReader`` over the photos as the predictor feeds them,
    in batches; ``set_range`` is what ORT's ``CalibStridedMinMax`` calls to calibrate one batch at a time
    (ranges merged), so memory holds one batch's intermediate tensors, not every photo's."""

    def __init__(self, photos: list, cfg, batch_size: int = 16):
        self.photos, self.cfg, self.batch_size = photos, cfg, batch_size
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.photos) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        b, cfg = self.batch_size, self.cfg
        chunk = self.photos[start_index * b:end_index * b]
        self.data = iter(loader(ImageDataset(chunk, None, eval_transform(cfg.img_size, cfg.mean, cfg.std),
                                             cfg.img_size), b, workers=0))

    def get_next(self):
        batch = next(self.data, None)
        return None if batch is None else {"images": batch[0].numpy()}


def quantize_int8(fp32: Path, out: Path, photos: list, cfg, keep: tuple[str, ...], reduce_range: bool = False) -> None:
    """Static int8 (QDQ, per-channel weights, min-max ranges over ``photos``), ``keep`` in float.
    ``reduce_range``: 7-bit weights, ORT's remedy for the U8S8 saturation of AVX2 CPUs without VNNI."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))          # shape inference + fusions, as ORT's docs advise
        quantize_static(str(pre), str(out), _Calibration(photos, cfg), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=float_nodes(onnx.load(str(pre)), keep),
                        extra_options={"CalibStridedMinMax": 1})      # one batch at a time


def compare(fp32: Predictor, other: Predictor, photos: list, y: np.ndarray, taxonomy) -> dict:
    """What a backend changes against fp32 on labelled photos: top-1 and log loss of the answer
    (``metrics.evaluate_probs``), and the cosine of each photo's two embeddings."""
    a, b = fp32(photos, keep=("probs", "embedding")), other(photos, keep=("probs", "embedding"))
    ea, eb = evaluate_probs(a["probs"], y, taxonomy), evaluate_probs(b["probs"], y, taxonomy)
    cos = (a["embedding"] * b["embedding"]).sum(1)
    return {"photos": int(len(y)), "top1_fp32": ea["top1"], "top1": eb["top1"], "log_loss_fp32": ea["log_loss"],
            "log_loss": eb["log_loss"], "top1_change": eb["top1"] - ea["top1"],
            "log_loss_change": eb["log_loss"] - ea["log_loss"],
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def export_int8(path: str | Path, data: str | Path | None = None, photos: int = CALIBRATION_PHOTOS,
                keep: tuple[str, ...] = ("stem", "head"), reduce_range: bool = True) -> dict:
    """``hier export --int8``: ARTIFACT/model.int8.onnx, calibrated on ``photos`` of the artifact's
    own training photos (or ``data``'s, split the same way), then measured against fp32 on the
    validation photos; the change is stored in config.json["int8"] and returned. An explicit choice:
    ``auto`` never picks it. ``reduce_range`` (7-bit weights) by default: on this AVX2 CPU without VNNI
    full-range weights lost 1.3 points of top-1, 7-bit ones none (docs/benchmarks/speed.md)."""
    path = Path(path)
    with fileio.locked(path):
        net, taxonomy = artifact.load(path)
        if not export_is_fresh(path, net):
            export(path)
        train, val, labels = split_photos(path, Path(data) if data else None, taxonomy)
        pick = np.random.default_rng(0).permutation(len(train))[:photos]
        with tempfile_path(path, INT8) as tmp:
            try:
                quantize_int8(path / artifact.ONNX, tmp, [train[i] for i in sorted(pick)], net.cfg, keep,
                              reduce_range)
            except OSError as e:               # a full disk (or read-only folder) under the quantizer
                refused = fileio.refused_write(e, path / INT8)
                if refused is None:
                    raise
                raise refused from None
            y = np.array([taxonomy.class_index[c] for c in labels])
            change = compare(Predictor(net, onnx=path / artifact.ONNX), Predictor(net, onnx=tmp), val, y, taxonomy)
            config = artifact.read_config(path)
            config["int8"] = {"file": INT8, "fingerprint": net.fingerprint(), "views": config["onnx"].get("views", 1),
                              "calibration_photos": len(pick), "float": list(keep), "reduce_range": reduce_range,
                              "validation": change}
            fileio.atomic_write_all({path / INT8: lambda p: p.write_bytes(tmp.read_bytes()),
                                       path / artifact.CONFIG: lambda p: fileio.write_json(p, config)})
    return config["int8"]


@contextlib.contextmanager
def tempfile_path(folder: Path, name: str) -> Iterator[Path]:
    """A scratch file beside ``name`` in ``folder``, removed on the way out."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
