"""The one batched forward pass: photos in, embeddings, head logits and calibrated probabilities out.

Every command goes through ``Predictor`` (predict, evaluate, enroll, index, similar, the temperature
fit at the end of training), with the artifact's own TTA setting and temperature, so an embedding or a
probability for a photo is the same whichever command computed it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hier.data import ImageDataset, eval_transform, loader
from hier.metrics import served_answer, softmax
from hier.models import HierNet
from hier.runtime.sessions import OrtSession

if TYPE_CHECKING:
    from hier.runtime.sessions import OpenVinoSession


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def decode_workers(photos: int, cpus: int | None) -> int:
    """Decoding processes beside the network when a caller does not say: none for a handful of photos
    (starting one costs more than it saves), else one per spare core, at most 4: one worker decoding the next batch
    while the network runs is faster on 2 cores (docs/benchmarks/speed.md)."""
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
    enrolled classes need no re-export). ONNX Runtime computes the embeddings then, of the photos and,
    with TTA, of their mirror images in the same batch; the outputs equal the eager model's to ~1e-6.
    ``session``: any object with ``views`` and ``run(images) -> (V, N, D) embeddings`` instead
    (``OrtSession``, ``OpenVinoSession``). An export holds one view (V = 1), so ``tta=False`` halves its
    work; an older export of both views (V = 2) computes both whatever ``tta`` says.
    """

    def __init__(self, net: HierNet, tta: bool | None = None, batch_size: int = 64, workers: int | None = None,
                 onnx: str | Path | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 session: "OrtSession | OpenVinoSession | None" = None):
        self.net = net.eval()
        self.tta = net.cfg.tta if tta is None else tta
        self.batch_size, self.workers = batch_size, workers
        self.session = OrtSession(onnx, providers) if session is None and onnx is not None else session
        self.views = self.session.views if self.session is not None else 0

    def _embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One embedding per view (the photo, and its mirror image with TTA)."""
        if self.session is not None:
            images = x.cpu().numpy()
            if self.views >= 2:                  # an older export: both views inside the graph
                z = self.session.run(images)[:2 if self.tta else 1]
            elif self.tta:                       # the mirror images as more photos of the batch
                z = self.session.run(np.concatenate([images, images[..., ::-1]]))[0].reshape(2, len(images), -1)
            else:
                z = self.session.run(images)
            return list(torch.from_numpy(np.ascontiguousarray(z)).to(x.device))
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
            out["probs"], out["answer"] = served_answer(out["joint"], cfg.temperature, *maps)
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
