"""``hier export``: the trunk and embedding of an artifact as ONNX (``model.onnx``), one view."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from hier import artifact, fileio
from hier.models import HierNet


class ViewEmbedder(torch.nn.Module):
    """What ``hier export`` writes: normalised images (N, 3, H, W) -> embeddings (1, N, D), the leading
    axis the views (``Predictor`` feeds TTA's mirror images as more photos; exports before it held 2)."""

    def __init__(self, net: HierNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images)[None]


def export_onnx(net: HierNet, path: Path) -> None:
    """The trunk + embedding of ``net`` as ONNX (opset 17, dynamic batch), one view: with TTA the
    predictor adds the mirror images to the batch, so ``--no-tta`` costs half. The TorchScript exporter
    needs only the ``onnx`` package."""
    x = torch.randn(2, 3, net.cfg.img_size, net.cfg.img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ViewEmbedder(net.eval()), x, str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "n"}, "embeddings": {1: "n"}})


def export(path: str | Path) -> Path:
    """``hier export``: ARTIFACT/model.onnx, with the fingerprint of the weights it holds in config.json."""
    path = Path(path)
    with fileio.locked(path):
        net, _ = artifact.load(path)
        config = artifact.read_config(path)
        config["onnx"] = {"file": artifact.ONNX, "fingerprint": net.fingerprint(), "views": 1}
        fileio.atomic_write_all({path / artifact.ONNX: lambda p: export_onnx(net, p),
                                   path / artifact.CONFIG: lambda p: fileio.write_json(p, config)})
    return path / artifact.ONNX
