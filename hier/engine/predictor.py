"""The one batched forward pass: photos in, embeddings, head logits and calibrated probabilities out.

Every command goes through ``Predictor`` (predict, evaluate, enroll, index, similar, the temperature
fit at the end of training), with the artifact's own TTA setting and temperature, so an embedding or a
probability for a photo is the same whichever command computed it.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hier import artifact, fileio
from hier.data import ImageDataset, eval_transform, loader
from hier.errors import HierError, HierWarning
from hier.metrics import answer_class, softmax
from hier.models import HierNet


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def decode_workers(photos: int, cpus: int | None) -> int:
    """Decoding processes beside the network when a caller does not say: none for a handful of photos
    (starting one costs more than it saves), else one per spare core, at most 4. Measured on 2 cores with
    ONNX Runtime: 1 worker decodes the next batch while the network runs, +13% photos/s (README)."""
    if photos < 2 * 32 or not cpus or cpus < 2:
        return 0
    return min(4, cpus - 1)


class Predictor:
    """``Predictor(net)(images)`` -> {"joint", "fine", "model", "brand", "embedding", "probs", "answer"}
    (and ``trained``, the trained head's joint, when the class statistics serve).

    ``images``: paths, ``Crop`` boxes, PIL images or uint8 arrays. With TTA (the artifact's ``cfg.tta``
    unless overridden) the flipped view is added: joint scores are averaged as log-probabilities (a
    geometric mean of the two views' distributions), embeddings averaged and re-normalised. ``probs``
    applies the artifact's temperature to ``joint``.

    ``onnx``: an ``hier export`` file of the trunk + embedding (the costly part; the heads stay here, so
    enrolled classes need no re-export). ONNX Runtime computes the embeddings of both views then; the
    outputs equal the eager model's to ~1e-6.
    """

    def __init__(self, net: HierNet, tta: bool | None = None, batch_size: int = 64, workers: int | None = None,
                 onnx: str | Path | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        self.net = net.eval()
        self.tta = net.cfg.tta if tta is None else tta
        self.batch_size, self.workers = batch_size, workers
        self.session = None
        if onnx is not None:
            import onnxruntime as ort
            self.session = ort.InferenceSession(str(onnx), providers=list(providers))
            self.views = self.session.get_outputs()[0].shape[0]
            if self.tta and self.views < 2:
                self.session = None          # exported without the flipped view: eager does both

    def _embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One embedding per view (the photo, and its mirror image with TTA)."""
        if self.session is not None:
            z = torch.from_numpy(self.session.run(None, {"images": x.cpu().numpy()})[0]).to(x.device)
            return list(z[:2 if self.tta else 1])
        return [self.net.embed(v) for v in ([x, x.flip(3)] if self.tta else [x])]

    @torch.no_grad()
    def batches(self, images: list, progress=None) -> Iterator[dict[str, np.ndarray]]:
        """The outputs batch by batch (``__call__``'s keys), so a caller that keeps only some of them
        never holds every photo's logits (a gallery of 1M photos: the embeddings, not 6 GB of scores)."""
        net, cfg = self.net, self.net.cfg
        dev = next(net.parameters()).device
        images = list(images)
        workers = decode_workers(len(images), os.cpu_count()) if self.workers is None else self.workers
        data = loader(ImageDataset(images, None, eval_transform(cfg.img_size, cfg.mean, cfg.std), cfg.img_size),
                      self.batch_size, workers=workers)
        task = progress.add_task("predict", total=len(images), info="") if progress else None
        maps = (net.fine_to_model.cpu().numpy(), net.fine_to_brand.cpu().numpy())
        for x, _ in data:
            zs = self._embeddings(x.to(dev))
            outs = [net.heads(z) for z in zs]
            out = {k: torch.stack([o[k] for o in outs]).mean(0) for k in ("fine", "model", "brand")}
            for k in [k for k in ("joint", "trained") if k in outs[0]]:
                out[k] = torch.stack([torch.log_softmax(o[k], 1) for o in outs]).mean(0) if self.tta else outs[0][k]
            out["embedding"] = F.normalize(torch.stack(zs).mean(0), dim=1)
            out = {k: v.float().cpu().numpy() for k, v in out.items()}
            out["probs"] = softmax(out["joint"], cfg.temperature)
            out["answer"] = answer_class(out["probs"], *maps)          # ``metrics.answer``'s fine class
            if progress:
                progress.advance(task, len(x))
            yield out

    def __call__(self, images: list, progress=None, keep: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Every photo's outputs, concatenated; ``keep`` names the ones to hold (all by default)."""
        chunks: dict[str, list] = {}
        for out in self.batches(images, progress):
            for k, v in out.items():
                if keep is None or k in keep:
                    chunks.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in chunks.items()}

    @torch.no_grad()
    def probs_of(self, embeddings: np.ndarray) -> np.ndarray:
        """Calibrated fine-class probabilities of stored embeddings (a gallery's listings, answered again
        by the head of now): the heads on the (view-averaged) embedding, the artifact's temperature."""
        dev = next(self.net.parameters()).device
        joint = self.net.heads(torch.from_numpy(np.ascontiguousarray(embeddings, np.float32)).to(dev))["joint"]
        return softmax(joint.float().cpu().numpy(), self.net.cfg.temperature)


class ViewEmbedder(torch.nn.Module):
    """What ``hier export`` writes: normalised images (N, 3, H, W) -> embeddings of each view (V, N, D)."""

    def __init__(self, net: HierNet, views: int):
        super().__init__()
        self.net, self.views = net, views

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.net.embed(v) for v in [images, images.flip(3)][:self.views]])


def export_onnx(net: HierNet, path: Path) -> None:
    """The trunk + embedding of ``net`` as ONNX (opset 17, dynamic batch), both views when it serves
    with TTA. The TorchScript exporter needs only the ``onnx`` package."""
    views = 2 if net.cfg.tta else 1
    x = torch.randn(2, 3, net.cfg.img_size, net.cfg.img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ViewEmbedder(net.eval(), views), x, str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "n"}, "embeddings": {1: "n"}})


BACKENDS = ("auto", "torch", "onnx")


def export(path: str | Path) -> Path:
    """``hier export``: ARTIFACT/model.onnx, with the fingerprint of the weights it holds in config.json."""
    path = Path(path)
    with fileio.locked(path):
        net, _ = artifact.load(path)
        config = artifact.read_config(path)
        config["onnx"] = {"file": artifact.ONNX, "fingerprint": net.fingerprint(), "views": 2 if net.cfg.tta else 1}
        fileio.atomic_write_all({path / artifact.ONNX: lambda p: export_onnx(net, p),
                                   path / artifact.CONFIG: lambda p: fileio.write_json(p, config)})
    return path / artifact.ONNX


def choose_backend(requested: str, export_fresh: bool, providers: list[str], device: str) -> tuple[str, tuple]:
    """(``torch`` | ``onnx``, ONNX Runtime providers to use) for a net on ``device``, given whether the
    artifact holds an up-to-date export and the providers ONNX Runtime offers (empty: not installed).
    ``auto`` takes ONNX Runtime only where it runs on the net's own device: on a GPU host with the CPU
    build of ONNX Runtime, eager CUDA is faster than ONNX on the CPU. A pure function, tested on CPU."""
    if requested not in BACKENDS:
        raise HierError(f"unknown backend {requested!r}; choose {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch", ()
    if requested == "onnx" and not (export_fresh and providers):
        raise HierError("no up-to-date ONNX export (run `hier export`)" if not export_fresh else
                        "--backend onnx needs onnxruntime (pip install onnxruntime or onnxruntime-gpu)")
    if not (export_fresh and providers):
        return "torch", ()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in providers:
            return "onnx", ("CUDAExecutionProvider", "CPUExecutionProvider")
        return ("onnx", ("CPUExecutionProvider",)) if requested == "onnx" else ("torch", ())
    return "onnx", ("CPUExecutionProvider",)


def onnx_providers() -> list[str]:
    """The execution providers of the installed ONNX Runtime (empty when it is not installed)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime as ort
    return list(ort.get_available_providers())


def export_is_fresh(path: Path, net: HierNet) -> bool:
    """The artifact holds an ONNX export of these very weights."""
    saved = artifact.read_config(path).get("onnx", {})
    return (path / artifact.ONNX).is_file() and saved.get("fingerprint") == net.fingerprint()


def export_on_first_use(path: Path) -> bool:
    """Export a missing or stale ONNX file now (under the artifact's lock, as ``hier export``), so
    ``auto`` is fast without the user knowing about ONNX; an artifact that cannot be written (read-only,
    disk full) answers on eager PyTorch with one warning."""
    try:
        export(path)
        return True
    except (HierError, OSError, RuntimeError) as e:
        warnings.warn(f"{path}: could not write its ONNX export ({str(e).splitlines()[0][:120]}); answering with "
                      "eager PyTorch, slower", HierWarning, stacklevel=3)
        return False


def artifact_predictor(path: str | Path, net: HierNet, backend: str = "auto", **kw) -> Predictor:
    """The artifact's predictor, on the backend ``choose_backend`` picks: ONNX Runtime when it runs on
    the net's device, eager PyTorch otherwise. ``auto`` exports the weights first when the export is
    missing or stale (after ``hier train --resume``); ``onnx`` refuses a stale export. The caller holds
    the artifact's lock when it compares versions (``artifact.stamp``) across this call."""
    path = Path(path)
    if backend not in BACKENDS:
        raise HierError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "torch":
        return Predictor(net, **kw)
    providers, where = onnx_providers(), str(next(net.parameters()).device)
    fresh = export_is_fresh(path, net)
    if not fresh and backend == "auto" and choose_backend("auto", True, providers, where)[0] == "onnx":
        fresh = export_on_first_use(path)
    try:
        kind, providers = choose_backend(backend, fresh, providers, where)
    except HierError as e:
        raise HierError(f"{path}: {e}") from None
    return Predictor(net, onnx=path / artifact.ONNX, providers=providers, **kw) if kind == "onnx" else Predictor(net, **kw)
