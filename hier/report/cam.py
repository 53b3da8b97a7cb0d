"""Class-activation maps (Grad-CAM, Selvaraju et al. 2017) through a forward hook on the trunk's
global pool: the last feature map, weighted by the gradient of the chosen class's joint score."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from hier.data import eval_transform, to_rgb
from hier.errors import HierError
from hier.models import HierNet


def grad_cam(net: HierNet, images: list, classes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps in [0, 1] (N x h x w, the trunk's resolution) for ``classes`` (default: each photo's
    top-1 fine class), and the classes used."""
    pool = getattr(net.trunk, "global_pool", None)
    if pool is None:
        raise HierError(f"class-activation maps need a timm trunk with a global_pool; {net.cfg.trunk} has none")
    cfg = net.cfg
    transform = eval_transform(cfg.img_size, cfg.mean, cfg.std)
    x = torch.stack([transform(image=to_rgb(im, cfg.img_size))["image"] for im in images])
    x = x.to(next(net.parameters()).device)
    seen = {}
    hook = pool.register_forward_hook(lambda m, inp, out: seen.__setitem__("features", inp[0]))
    try:
        net.eval()
        with torch.enable_grad():
            joint = net(x)["joint"]
            features = seen["features"]
            chosen = joint.argmax(1) if classes is None else torch.as_tensor(classes, device=joint.device)
            grads, = torch.autograd.grad(joint.gather(1, chosen[:, None]).sum(), features)
    finally:
        hook.remove()
    cam = F.relu((grads.mean((2, 3), keepdim=True) * features).sum(1)).detach()
    cam = cam / cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return cam.cpu().numpy(), chosen.cpu().numpy()


def overlay(image, heat: np.ndarray, size: int = 320, alpha: float = 0.45) -> Image.Image:
    """The photo (longest side ``size``) with the heat map in the jet colours blended over it."""
    photo = Image.fromarray(to_rgb(image))
    photo.thumbnail((size, size))
    heat_img = Image.fromarray(np.uint8(255 * heat)).resize(photo.size, Image.BILINEAR)
    colours = np.uint8(255 * colormaps["jet"](np.asarray(heat_img) / 255.0)[..., :3])
    return Image.blend(photo, Image.fromarray(colours), alpha)


def save_overlays(net: HierNet, images: list, out: Path, names: list[str], batch: int = 16) -> list[Path]:
    """``out/<name>.png`` per photo: its top-1 class's activation map over it."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(0, len(images), batch):
        heats, _ = grad_cam(net, images[i:i + batch])
        for image, heat, name in zip(images[i:i + batch], heats, names[i:i + batch]):
            written.append(out / f"{name}.png")
            overlay(image, heat).save(written[-1])
    return written
