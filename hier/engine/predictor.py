"""The one batched forward pass: photos in, embeddings, head logits and calibrated probabilities out.

Every command goes through ``Predictor`` (predict, evaluate, enroll, index, similar, the temperature
fit at the end of training), with the artifact's own TTA setting and temperature, so an embedding or a
probability for a photo is the same whichever command computed it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hier.data import ImageDataset, eval_transform, loader
from hier.metrics import softmax
from hier.models import HierNet


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """``Predictor(net)(images)`` -> {"joint", "fine", "model", "brand", "embedding", "probs"}.

    ``images``: paths, PIL images or uint8 arrays. With TTA (the artifact's ``cfg.tta`` unless
    overridden) the flipped view is added: joint scores are averaged as log-probabilities (a geometric
    mean of the two views' distributions), embeddings averaged and re-normalised. ``probs`` applies the
    artifact's temperature to ``joint``.
    """

    def __init__(self, net: HierNet, tta: bool | None = None, batch_size: int = 64, workers: int = 0):
        self.net = net.eval()
        self.tta = net.cfg.tta if tta is None else tta
        self.batch_size, self.workers = batch_size, workers

    @torch.no_grad()
    def __call__(self, images: list, progress=None) -> dict[str, np.ndarray]:
        net, cfg = self.net, self.net.cfg
        dev = next(net.parameters()).device
        data = loader(ImageDataset(list(images), None, eval_transform(cfg.img_size, cfg.mean, cfg.std)),
                      self.batch_size, workers=self.workers)
        task = progress.add_task("predict", total=len(images), info="") if progress else None
        chunks: dict[str, list] = {}
        for x, _ in data:
            x = x.to(dev)
            zs = [net.embed(v) for v in ([x, x.flip(3)] if self.tta else [x])]
            outs = [net.heads(z) for z in zs]
            out = {k: torch.stack([o[k] for o in outs]).mean(0) for k in ("fine", "model", "brand")}
            out["joint"] = torch.stack([torch.log_softmax(o["joint"], 1) for o in outs]).mean(0) if self.tta \
                else outs[0]["joint"]
            out["embedding"] = F.normalize(torch.stack(zs).mean(0), dim=1)
            for k, v in out.items():
                chunks.setdefault(k, []).append(v.float().cpu().numpy())
            if progress:
                progress.advance(task, len(x))
        if not chunks:
            return {}
        out = {k: np.concatenate(v) for k, v in chunks.items()}
        out["probs"] = softmax(out["joint"], cfg.temperature)
        return out
