"""What a training run is told: ``TrainConfig`` (every ``hier train`` flag that is not the model's),
the named presets, and ``configs``, the one place a preset and the flags given are merged."""
from __future__ import annotations

import difflib
import numbers
import typing
from dataclasses import dataclass
from typing import TypedDict

from typing_extensions import Unpack

from hier.data.split import SplitSettings
from hier.errors import HierError, check_number
from hier.models import ModelConfig
from hier.models.losses import LOSSES


@dataclass
class TrainConfig:
    """The settings of a training run (each a ``hier train`` flag), checked on creation. Those that decide
    the run's photos and split default to ``SplitSettings``' (one place for them)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3            # trunk
    head_lr: float = 3e-3       # embedding projection and cosine heads
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    smoothing: float = 0.1
    aux: float = 0.5            # weight of the model/brand head losses
    ema: bool = True
    ema_decay: float = 0.998
    accum: int = 1
    amp: bool = True
    cache_views: int = 0        # augmented views of the frozen stem's output to precompute (0: stream)
    val_frac: float = SplitSettings.val_frac
    fold: int | None = SplitSettings.fold
    folds: int = SplitSettings.folds
    seed: int = SplitSettings.seed
    workers: int = 0
    pretrained: str = "auto"
    layout: str = SplitSettings.layout  # how the training data is laid out on disk (hier.data.readers)
    crop: str = SplitSettings.crop  # none | yolo: train on the largest vehicle box of each photo
    detector: str | None = SplitSettings.detector  # ultralytics weights for --crop yolo
    export: bool = True         # write the ONNX export at the end (what `hier predict` runs on)
    exclude: str | None = SplitSettings.exclude   # photos (paths below DATA) not to train on: `hier audit`'s
    # the competitors' recipe (each lever measured by scripts/bench_recipe.py: docs/benchmarks/recipe.md)
    aug: str = "light"          # augmentation policy: none | light | seed | randaug (hier.data.augment)
    mixup: float = 0.0          # MixUp alpha on the batch (timm Mixup; 0: off)
    cutmix: float = 0.0         # CutMix alpha (with --mixup too: one or the other per batch)
    loss: str = "ce"            # ce | focal | poly1 | penalty (hier.models.losses)
    swa_epochs: int = 0         # average the weights of the last N epochs (SWA); kept if it validates better
    layer_decay: float | None = None   # layer-wise LR decay of the trunk (timm's, per block; e.g. 0.85)
    low_res: int = 0            # progressive resizing: the first --low-res-epochs at this size ...
    low_res_epochs: int = 0     # ... then the rest at --img-size
    tensorboard: bool = False   # TensorBoard scalars in OUT/tensorboard (pip install tensorboard)
    merge_classes: str | None = SplitSettings.merge_classes   # class_a,class_b CSV: b's photos learned as a

    def __post_init__(self) -> None:
        """Refuse settings that would train nothing, crash later or put nan into the weights (one error
        line, before any work): every number through ``check_number``, so nan and inf are refused too."""
        for name, low, high in (("epochs", 1, 100_000), ("batch_size", 1, 65_536), ("accum", 1, 4096),
                                ("cache_views", 0, 1000), ("workers", 0, 256), ("folds", 2, 1000),
                                ("seed", 0, 2 ** 32 - 1), ("swa_epochs", 0, self.epochs),
                                ("low_res", 0, 4096), ("low_res_epochs", 0, self.epochs - 1)):
            setattr(self, name, check_number(_flag(name), getattr(self, name), low, high, integer=True))
        if self.fold is not None:
            self.fold = check_number("--fold", self.fold, 0, self.folds - 1, integer=True)
        for name in ("lr", "head_lr"):          # no upper bound: a diverging run says so itself
            if not check_number(_flag(name), getattr(self, name)) > 0:
                raise HierError(f"{_flag(name)} must be positive, not {getattr(self, name)}")
        for name, low, high in (("weight_decay", 0, 10), ("warmup_epochs", 0, 100_000), ("smoothing", 0, 1),
                                ("aux", 0, 100), ("ema_decay", 0, 1), ("val_frac", 0, 1), ("mixup", 0, 100),
                                ("cutmix", 0, 100)):
            setattr(self, name, check_number(_flag(name), getattr(self, name), low, high))
        if self.layer_decay is not None:
            self.layer_decay = check_number("--layer-decay", self.layer_decay, 0, 1)
            if not self.layer_decay > 0:
                raise HierError("--layer-decay must be above 0 (1: every layer at --lr)")
        from hier.data.augment import AUG_POLICIES  # training's alone: predicting never imports albumentations
        if self.aug not in AUG_POLICIES:
            raise HierError(f"--aug must be one of {', '.join(AUG_POLICIES)}, not {self.aug!r}")
        if self.loss not in LOSSES:
            raise HierError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if bool(self.low_res) != bool(self.low_res_epochs):
            raise HierError("--low-res SIZE and --low-res-epochs N go together (progressive resizing)")
        if self.val_frac == 1:
            raise HierError("--val-frac must be below 1: no photo would be left to train on")
        if self.crop not in ("none", "yolo") or (self.crop == "yolo") != (self.detector is not None):
            raise HierError("--crop yolo goes with --detector PATH (ultralytics weights), --crop none without")


class TrainFlags(TypedDict, total=False):
    """The ``hier train`` options as keyword arguments of ``Recognizer.train`` and ``configs``: the model's
    (``ModelConfig``) and the run's (``TrainConfig``), typed for editors and type checkers. Each is
    described on its config; a test keeps this list equal to the two configs' settable fields."""

    # ModelConfig
    trunk: str
    img_size: int
    embed_dim: int
    alpha: float
    beta: float
    scale: float
    drop: float
    freeze_stages: int
    tta: bool
    head: str
    # TrainConfig
    epochs: int
    batch_size: int
    lr: float
    head_lr: float
    weight_decay: float
    warmup_epochs: float
    smoothing: float
    aux: float
    ema: bool
    ema_decay: float
    accum: int
    amp: bool
    cache_views: int
    val_frac: float
    fold: int | None
    folds: int
    seed: int
    workers: int
    pretrained: str
    layout: str
    crop: str
    detector: str | None
    export: bool
    exclude: str | None
    aug: str
    mixup: float
    cutmix: float
    loss: str
    swa_epochs: int
    layer_decay: float | None
    low_res: int
    low_res_epochs: int
    tensorboard: bool
    merge_classes: str | None


MODEL_STATE = ("temperature", "mean", "std")   # ModelConfig fields training sets itself, not flags


CLI_NAMES = {"model": "trunk"}    # `hier train` flags whose Python name differs (--model: any timm trunk)


def _unknown(name: str, settable: set[str]) -> str:
    """``name`` and what was probably meant: its Python name, or the closest setting's."""
    if name in CLI_NAMES:
        return f"{name!r} (the CLI's --{name} is {CLI_NAMES[name]}= here)"
    close = difflib.get_close_matches(name, sorted(settable), n=1)
    return f"{name!r}" + (f" (did you mean {close[0]}=?)" if close else "")


def _kinds(annotation) -> tuple[type, ...]:
    return tuple(t for t in typing.get_args(annotation) or (annotation,) if t is not type(None))


def _fits(value, annotation) -> bool:
    """``value`` is of a flag's type: a bool only where a bool goes, a whole number where a float does."""
    if isinstance(value, bool):
        return bool in _kinds(annotation)
    return any(isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real)
               if kind is float else isinstance(value, kind) for kind in _kinds(annotation))


def _kind(annotation) -> str:
    words = {int: "a whole number", float: "a number", str: "text", bool: "True or False"}
    return " or ".join(words[k] for k in _kinds(annotation))


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


# Named presets: flags that reached a measured result (docs/benchmarks/train.md, recipe.md).
PRESETS: dict[str, dict] = {
    # the best measured within the 45-minute CPU budget: the whole offline lite1 trunk, progressive resizing
    # (12 epochs at 160 px, 6 at 224)
    "cpu": {"model": {"trunk": "efficientnet_lite1", "freeze_stages": 0, "img_size": 224, "tta": True},
            "train": {"epochs": 18, "low_res": 160, "low_res_epochs": 12, "lr": 1e-3, "head_lr": 3e-3,
                      "ema": False, "aux": 0.1}},
    # the earlier `cpu`: lite0 with 4 frozen stages whose output is cached for 6 views
    "cpu-cached": {"model": {"freeze_stages": 4, "img_size": 224, "tta": True},
                   "train": {"cache_views": 6, "epochs": 20, "lr": 1e-3, "head_lr": 3e-3, "ema": False, "aux": 0.1}},
    # lite0, the whole trunk at 224 px throughout: the enrollment benchmark's base (figures: docs/benchmarks/train.md)
    "cpu-max": {"model": {"freeze_stages": 0, "img_size": 224, "tta": True},
                "train": {"epochs": 12, "lr": 1e-3, "head_lr": 3e-3, "ema": False, "aux": 0.1}},
}


def configs(preset: str | None = None, **flags: Unpack[TrainFlags]) -> tuple[ModelConfig, TrainConfig]:
    """A preset's settings overridden by the flags given (None = not given): the one place presets are
    merged, for the CLI, the Python API and the benchmarks alike.

    Raises:
        HierError: an unknown preset or setting (one the model sets itself, ``MODEL_STATE``, included),
            or a value out of range.
    """
    if preset is not None and preset not in PRESETS:
        raise HierError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    chosen = PRESETS.get(preset, {"model": {}, "train": {}})
    model_keys, train_keys = set(ModelConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    settable = (model_keys - set(MODEL_STATE)) | train_keys
    unknown = sorted(set(flags) - settable)           # a misspelled name is refused even given as None
    if unknown:
        raise HierError("unknown training setting(s): " + "; ".join(_unknown(name, settable) for name in unknown))
    given = {k: v for k, v in flags.items() if v is not None}
    types = typing.get_type_hints(TrainFlags)
    wrong = [name for name, value in given.items() if not _fits(value, types[name])]
    if wrong:                 # "no" would have stored as tta, "1" failed deep inside with a TypeError
        raise HierError("; ".join(f"{name}={given[name]!r} is not {_kind(types[name])}" for name in wrong))
    train_flags = {**chosen["train"], **{k: v for k, v in given.items() if k in train_keys}}
    if "low_res_epochs" in chosen["train"] and "epochs" in given and "low_res_epochs" not in given:
        # a preset's progressive resizing keeps its share of a run made longer or shorter
        share = chosen["train"]["low_res_epochs"] / chosen["train"]["epochs"]
        low = min(round(share * train_flags["epochs"]), train_flags["epochs"] - 1) if train_flags["epochs"] > 1 else 0
        train_flags.update(low_res_epochs=low, low_res=train_flags["low_res"] if low else 0)
    return (ModelConfig(**{**chosen["model"], **{k: v for k, v in given.items() if k in model_keys}}),
            TrainConfig(**train_flags))

