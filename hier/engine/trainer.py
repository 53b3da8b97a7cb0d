"""Fit a HierNet: AdamW + warmup/cosine (timm scheduler), EMA, AMP on CUDA, gradient accumulation,
best checkpoint by validation log loss, resume, temperature scaling at the end; on one process or as
one rank of ``torchrun`` (``hier.engine.distributed``: DDP, rank 0 validates and writes).

With ``freeze_stages`` > 0 and ``cache_views`` > 0 the frozen stem runs once per augmented view
before training and the trainable tail learns from the cached activations: on a CPU this is what
makes fine-tuning a real trunk fit in minutes.
"""
from __future__ import annotations

import csv
import os
import time
from contextlib import nullcontext
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.data import Mixup
from timm.utils import ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler

from hier import artifact, fileio
from hier.artifact import GALLERY, ONNX
from hier.data.detect import CarDetector
from hier.data import ImageDataset, ImageSet, eval_transform, loader, split_indices
from hier.errors import HierError, HierWarning, check_number
from hier.enroll import PROTOTYPES, VALIDATION, class_means, save_validation
from hier.engine import distributed
from hier.engine.distributed import World
from hier.engine.predictor import Predictor, export, onnx_providers
from hier.data.readers import create_reader
from hier.metrics import answer, evaluate_probs, fit_temperature, softmax
from hier.models import HierNet, HierTask, ModelConfig
from hier.models.losses import LOSSES
from hier.models.statistics import STATISTICS, ClassStatistics
from hier.taxonomy import Taxonomy

CHECKPOINT = "checkpoint.pt"
CURVES = "curves.png"          # log.csv drawn at the end of the run
OOF = "oof.npz"                # the validation photos' served scores: what `hier ensemble` fits weights on


def save_oof(path: Path, paths: list, labels: np.ndarray, logits: np.ndarray, classes: list[str],
             data_dir: str | Path | None = None) -> None:
    """Out-of-fold predictions of a run: the photos' paths, true class indices, the served joint scores
    before the temperature (what the predictor computes, TTA as configured) and the class order. Paths
    below ``data_dir`` are kept relative to it (POSIX), so runs that spelled the folder differently (or
    ran on other machines) name the same photo alike when ``hier ensemble`` matches them."""
    root = Path(os.path.abspath(data_dir)) if data_dir is not None else None

    def key(p) -> str:
        # abspath, not resolve: a photo that is a symlink (a split of linked photos) stays below DATA
        if root is not None and isinstance(p, (str, Path)):
            try:
                return Path(os.path.abspath(p)).relative_to(root).as_posix()
            except ValueError:
                pass
        return str(p)
    with path.open("wb") as f:
        np.savez(f, paths=np.asarray([key(p) for p in paths]), labels=np.asarray(labels, dtype=np.int32),
                 logits=np.asarray(logits, dtype=np.float32), classes=np.asarray(classes))


def read_oof(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {k: saved[k] for k in ("paths", "labels", "logits", "classes")}


@dataclass
class TrainConfig:
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
    val_frac: float = 0.2
    fold: int | None = None
    folds: int = 5
    seed: int = 0
    workers: int = 0
    pretrained: str = "auto"
    layout: str = "auto"        # how the training data is laid out on disk (hier.data.readers)
    crop: str = "none"          # none | yolo: train on the largest vehicle box of each photo
    detector: str | None = None  # ultralytics weights for --crop yolo
    export: bool = True         # write the ONNX export at the end (what `hier predict` runs on)
    exclude: str | None = None  # file of photos (paths below DATA) not to train on: `hier audit --write-exclude`
    # the competitors' recipe (README "Training recipe"; each lever measured by scripts/bench_recipe.py)
    aug: str = "light"          # augmentation policy: none | light | seed | randaug (hier.data.augment)
    mixup: float = 0.0          # MixUp alpha on the batch (timm Mixup; 0: off)
    cutmix: float = 0.0         # CutMix alpha (with --mixup too: one or the other per batch)
    loss: str = "ce"            # ce | focal | poly1 | penalty (hier.models.losses)
    swa_epochs: int = 0         # average the weights of the last N epochs (SWA); kept if it validates better
    layer_decay: float | None = None   # layer-wise LR decay of the trunk (timm's, per block; e.g. 0.85)
    low_res: int = 0            # progressive resizing: the first --low-res-epochs at this size ...
    low_res_epochs: int = 0     # ... then the rest at --img-size
    tensorboard: bool = False   # TensorBoard scalars in OUT/tensorboard (pip install tensorboard)
    merge_classes: str | None = None   # class_a,class_b CSV of pairs scored as one: b's photos learned as a

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
        from hier.data.augment import AUG_POLICIES     # training's alone: predicting never imports albumentations
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


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


# Named presets: flags that reached a measured result (see README "Benchmarks").
PRESETS: dict[str, dict] = {
    # the best measured within the 45-minute CPU budget: the whole offline lite1 trunk, progressive resizing
    # (12 epochs at 160 px, 6 at 224): 0.846 top-1 / 0.544 log loss in 31 min on the dev set, 2 cores
    "cpu": {"model": {"trunk": "efficientnet_lite1", "freeze_stages": 0, "img_size": 224, "tta": True},
            "train": {"epochs": 18, "low_res": 160, "low_res_epochs": 12, "lr": 1e-3, "head_lr": 3e-3,
                      "ema": False, "aux": 0.1}},
    # the earlier `cpu`: lite0 with 4 frozen stages whose output is cached for 6 views (0.812 / 0.677, 35 min)
    "cpu-cached": {"model": {"freeze_stages": 4, "img_size": 224, "tta": True},
                   "train": {"cache_views": 6, "epochs": 20, "lr": 1e-3, "head_lr": 3e-3, "ema": False, "aux": 0.1}},
    # lite0, the whole trunk at 224 px throughout (0.834 / 0.625, 54 min): the enrollment benchmark's base
    "cpu-max": {"model": {"freeze_stages": 0, "img_size": 224, "tta": True},
                "train": {"epochs": 12, "lr": 1e-3, "head_lr": 3e-3, "ema": False, "aux": 0.1}},
}


def configs(preset: str | None = None, **flags) -> tuple[ModelConfig, TrainConfig]:
    """A preset's settings overridden by the flags given (None = not given): the one place presets are
    merged, for the CLI, the Python API and the benchmarks alike."""
    if preset is not None and preset not in PRESETS:
        raise HierError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    chosen = PRESETS.get(preset, {"model": {}, "train": {}})
    given = {k: v for k, v in flags.items() if v is not None}
    model_keys, train_keys = set(ModelConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(given) - model_keys - train_keys)
    if unknown:
        raise HierError(f"unknown training setting {unknown[0]!r}")
    train_flags = {**chosen["train"], **{k: v for k, v in given.items() if k in train_keys}}
    if "low_res_epochs" in chosen["train"] and "epochs" in given and "low_res_epochs" not in given:
        # a preset's progressive resizing keeps its share of a run made longer or shorter
        share = chosen["train"]["low_res_epochs"] / chosen["train"]["epochs"]
        low = min(round(share * train_flags["epochs"]), train_flags["epochs"] - 1) if train_flags["epochs"] > 1 else 0
        train_flags.update(low_res_epochs=low, low_res=train_flags["low_res"] if low else 0)
    return (ModelConfig(**{**chosen["model"], **{k: v for k, v in given.items() if k in model_keys}}),
            TrainConfig(**train_flags))


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def prepare(data_dir: str | Path, taxonomy: Taxonomy | None, layout: str = "auto") -> tuple[ImageSet, Taxonomy]:
    """Read the data (``create_reader``) and narrow the taxonomy to its classes (in taxonomy order);
    unknown classes fail. Without a taxonomy: the layout's own (AI-hub labels) or parsed folder names."""
    images, implied = create_reader(data_dir, layout)()
    names = sorted(set(images.labels))
    taxonomy = taxonomy or implied
    if taxonomy is None:
        return images, Taxonomy.from_class_names(names)
    unknown = [c for c in names if c not in taxonomy]
    if unknown:
        raise HierError(f"class {unknown[0]!r} is in the data but not in the taxonomy "
                        f"({len(unknown)} such classes)")
    return images, taxonomy.subset([c for c in taxonomy.classes if c in set(names)])


def param_groups(model: HierNet, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: the trunk at ``lr``, the embedding and heads at ``head_lr``, each split by timm's
    rule into decayed weights and undecayed biases, norm layers and ``model.no_weight_decay()`` (the
    cosine heads' scales): weight decay no longer pulls those toward 0. Trunk groups first, so group
    0's lr is the trunk's (``log.csv``). With ``layer_decay`` the trunk's groups are timm's layer-wise
    ones instead (block i of n at ``lr * layer_decay ** (n - i)``, as ``lr_scale``, which timm's
    scheduler applies)."""
    trunk = {id(p) for p in model.trunk.parameters()}
    by_decay = param_groups_weight_decay(model, cfg.weight_decay, model.no_weight_decay())
    heads = [{**g, "params": ps, "lr": cfg.head_lr} for g in by_decay
             if (ps := [p for p in g["params"] if id(p) not in trunk])]
    if cfg.layer_decay is not None:
        skip = {n.removeprefix("trunk.") for n in model.no_weight_decay() if n.startswith("trunk.")}
        layered = param_groups_layer_decay(model.trunk, cfg.weight_decay, skip, layer_decay=cfg.layer_decay)
        return [{**g, "lr": cfg.lr} for g in sorted(layered, key=lambda g: -g["lr_scale"])] + heads
    return [{**g, "params": ps, "lr": cfg.lr} for g in by_decay
            if (ps := [p for p in g["params"] if id(p) in trunk])] + heads


class Trainer:
    def __init__(self, model: HierNet, taxonomy: Taxonomy, cfg: TrainConfig, out: Path,
                 console: Console | None = None, world: World = World(), merged: dict[str, str] | None = None,
                 data_dir: str | Path | None = None):
        """``world``: this process's rank in a torchrun launch (its process group already joined);
        ``merged``: classes whose photos are learned as an equivalent one (recorded in the artifact);
        ``data_dir``: the training folder, which ``oof.npz`` names its photos relative to."""
        self.model, self.taxonomy, self.cfg, self.out, self.world = model, taxonomy, cfg, Path(out), world
        self.data_dir = data_dir
        self.console = console or Console(stderr=True)
        self.dev = distributed.device_for(world, torch.cuda.device_count())
        distributed.rank_batch(cfg.batch_size, world)      # a global batch that does not split: refused now
        self.amp = cfg.amp and self.dev.startswith("cuda")
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.model.to(self.dev)
        self.task = HierTask(model, cfg.smoothing, cfg.aux, cfg.loss)
        # MixUp/CutMix on each batch (of photos, or of cached frozen-stage maps), soft targets label-smoothed
        self.mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=len(taxonomy)) if cfg.mixup or cfg.cutmix else None
        if self.mix is not None and (cfg.batch_size // world.size) % 2:
            raise HierError(f"--mixup/--cutmix mix each photo with another of its batch: --batch-size {cfg.batch_size} "
                            f"gives {cfg.batch_size // world.size} per process, use an even number")
        self.board = None
        if cfg.tensorboard and world.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise HierError("--tensorboard needs the tensorboard package (pip install 'hier[tensorboard]')") from None
            self.board = SummaryWriter(str(self.out / "tensorboard"))
        # channels-last on CUDA and on CPU alike: with oneDNN's convolutions a lite0 training step on 2 CPU cores
        # takes 3.75 s instead of 7.15 s (batch 32, 224 px; 1.14 s instead of 1.71 s at 128 px; 2026-12-02)
        self.model.to(memory_format=torch.channels_last)
        # the module each training step calls: DDP averages the ranks' gradients in backward
        self.step = DistributedDataParallel(self.task, device_ids=[self.dev] if self.dev != "cpu" else None) \
            if world.distributed else self.task
        self.opt = create_optimizer_v2(param_groups(model, cfg), "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
        self.epoch, self.updates, self.best, self.history = 0, 0, float("inf"), []
        self.swa: AveragedModel | None = None       # the running average of the last epochs' weights (SWA)
        self.merged = merged or {}                   # classes learned as their equivalent (--merge-classes)

    # --- data ---------------------------------------------------------------------------------------
    def _features(self, paths, transform, views: int, progress, what: str, shared: bool = False) -> torch.Tensor:
        """Frozen-stem activations for ``views`` passes of ``transform`` over the images: (V, N, ...).
        ``shared``: each rank computes every ``size``-th photo and they exchange, so the cache is built
        once however many processes train on it."""
        world = self.world if shared else World()
        mine = paths[world.rank::world.size]
        ds = ImageDataset(mine, None, transform, self.model.cfg.img_size)
        task = progress.add_task(what, total=views * len(mine), info="")
        out = []
        for _ in range(views):
            chunks = []
            for x, _ in loader(ds, 64, workers=self.cfg.workers):
                chunks.append(self.model.frozen_features(x.to(self.dev)).half().cpu())
                progress.advance(task, len(x))
            out.append(distributed.gather_rows(torch.cat(chunks), len(paths), world))
        return torch.stack(out)

    def _cached_batches(self, feats: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        """Global batches of (view, photo) draws, the same on every rank; each rank takes its share."""
        n, batch, world = feats.shape[1], self.cfg.batch_size, self.world
        order, view = torch.randperm(n, generator=gen), torch.randint(0, feats.shape[0], (n,), generator=gen)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            b = order[s:s + batch][world.rank::world.size]
            yield feats[view[b], b].to(self.dev).float(), y[b]

    # --- loop ---------------------------------------------------------------------------------------
    def fit(self, train_paths, train_y, val_paths, val_y) -> dict:
        cfg, model = self.cfg, self.model
        from hier.data.augment import train_transform
        tf_train = train_transform(model.cfg.img_size, model.cfg.mean, model.cfg.std, seed=cfg.seed, policy=cfg.aug)
        tf_eval = eval_transform(model.cfg.img_size, model.cfg.mean, model.cfg.std)
        ytr = torch.as_tensor(train_y)
        cached = cfg.cache_views > 0 and model.cfg.freeze_stages > 0
        if len(train_paths) < 2:
            raise HierError(f"{len(train_paths)} training photo(s) after the validation split; need at least 2")
        if cached and cfg.low_res:
            raise HierError("--low-res trains on photos, not on cached frozen-stage maps: add --cache-views 0")
        if cfg.low_res >= model.cfg.img_size:
            raise HierError(f"--low-res {cfg.low_res} must be below --img-size {model.cfg.img_size} (the first epochs "
                            "train on smaller photos; --low-res 0 --low-res-epochs 0 trains at one size)")
        world, validates = self.world, self.world.main and len(val_paths) > 0     # rank 0 alone validates
        dev_type = self.dev.split(":")[0]
        train_set = ImageDataset(train_paths, train_y, tf_train, model.cfg.img_size)
        # Under torchrun every rank takes its share of one permutation per epoch (seed + epoch), so the ranks
        # together step on whole global batches; one process keeps its own shuffle (the measured presets'
        # exact order).
        sampler = DistributedSampler(train_set, world.size, world.rank, shuffle=True, seed=cfg.seed, drop_last=True) \
            if world.distributed else None
        # Full batches only (BatchNorm cannot train on a batch of one), but never zero of them: fewer
        # photos than --batch-size train as one smaller batch. An optimizer step after every ``accum``
        # batches and after the last one.
        def photo_loader(dataset):
            return loader(dataset, max(1, min(cfg.batch_size, len(train_paths)) // world.size), shuffle=sampler is None,
                          workers=cfg.workers, drop_last=True, sampler=sampler)
        train_loader = None if cached else photo_loader(train_set)
        # progressive resizing: the first epochs on smaller photos (decoded small too), the same batches
        low_loader = photo_loader(ImageDataset(train_paths, train_y, train_transform(
            cfg.low_res, model.cfg.mean, model.cfg.std, seed=cfg.seed, policy=cfg.aug), cfg.low_res)) \
            if cfg.low_res else None
        batches = max(1, len(train_paths) // cfg.batch_size) if cached else len(train_loader)
        steps_per_epoch = -(-batches // cfg.accum)
        sched = CosineLRScheduler(self.opt, t_initial=cfg.epochs * steps_per_epoch, lr_min=1e-6,
                                  warmup_t=int(cfg.warmup_epochs * steps_per_epoch), warmup_lr_init=1e-5,
                                  t_in_epochs=False)
        gen = torch.Generator().manual_seed(cfg.seed)
        with progress_bar(self.console) as progress:
            feats = self._features(train_paths, tf_train, cfg.cache_views, progress, "cache train",
                                   shared=True) if cached else None
            val_feats = (self._features(val_paths, tf_eval, 1, progress, "cache val")[0]
                         if model.cfg.freeze_stages and validates else None)
            for epoch in range(self.epoch, cfg.epochs):
                gen.manual_seed(cfg.seed * 1000 + epoch)   # a resumed run sees the same batches
                torch.manual_seed(cfg.seed * 1000 + epoch)
                if sampler is not None:
                    sampler.set_epoch(epoch)
                t0, losses = time.time(), []
                model.train()
                low = epoch < cfg.low_res_epochs
                batches_of_epoch = self._cached_batches(feats, ytr, gen) if cached else \
                    low_loader if low else train_loader
                task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}" + f" at {cfg.low_res} px" * low,
                                         total=batches, info="")
                for i, (x, y) in enumerate(batches_of_epoch):
                    x, y = x.to(self.dev, memory_format=torch.channels_last if x.dim() == 4 else torch.preserve_format), \
                        y.to(self.dev)
                    if self.mix is not None and len(x) % 2 == 0:        # timm's Mixup pairs the batch with its reverse
                        x, y = self.mix(x, y)
                    f = x if cached else model.frozen_features(x)
                    steps = (i + 1) % cfg.accum == 0 or i + 1 == batches
                    # DDP exchanges gradients only on the batch that steps
                    syncs = nullcontext() if steps or not world.distributed else self.step.no_sync()
                    with syncs:
                        with torch.autocast(dev_type, dtype=self.amp_dtype, enabled=self.amp):
                            loss = self.step(f, y)["loss"]
                        if distributed.any_rank(not torch.isfinite(loss), world, self.dev):
                            raise HierError(f"training diverged: the loss is not finite at epoch {epoch + 1}, batch "
                                            f"{i + 1}; lower --lr / --head-lr (the artifact keeps the last good epoch)")
                        self.scaler.scale(loss / cfg.accum).backward()
                    if steps:
                        self.scaler.step(self.opt)
                        self.scaler.update()
                        self.opt.zero_grad(set_to_none=True)
                        self.updates += 1
                        sched.step_update(self.updates)
                        if self.ema:
                            self.ema.update(model, step=self.updates)
                    losses.append(loss.item())
                    progress.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.3f}")
                if world.distributed:      # as timm: the ranks' BatchNorm running statistics averaged
                    distribute_bn(model, world.size, reduce=True)
                    if self.ema:
                        distribute_bn(self.ema.module, world.size, reduce=True)
                if epoch >= cfg.epochs - cfg.swa_epochs:
                    self.swa = self.swa or AveragedModel(model)
                    self.swa.update_parameters(model)
                row = {"epoch": epoch + 1, "lr": self.opt.param_groups[0]["lr"],
                       "train_loss": distributed.mean_over_ranks(float(np.mean(losses)), world, self.dev),
                       "seconds": round(time.time() - t0, 1)}
                self.epoch = epoch + 1
                if not world.main:
                    continue
                if validates:
                    row.update(self._val_scores(self.validate(val_paths, val_feats, tf_eval), val_y))
                progress.update(task, info=" ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("val")))
                self._end_epoch(row)
        if not world.main:             # rank 0 computes the statistics and calibrates: one artifact
            return {}
        if self.swa is not None:
            self._finish_swa(feats, ytr, gen, train_loader, val_paths, val_y, val_feats, tf_eval, validates)
        if self.board is not None:
            self.board.close()
        if self.history:
            from hier.report.curves import plot_curves
            plot_curves(self.history, self.out / CURVES)
        return self.finish(train_paths, train_y, val_paths, val_y)

    @torch.no_grad()
    def _finish_swa(self, feats, ytr, gen, train_loader, val_paths, val_y, val_feats, tf_eval, validates) -> None:
        """The averaged weights of the last ``swa_epochs`` epochs: BatchNorm statistics recomputed for them
        on one pass of training batches (averaged weights do not fit any epoch's running statistics), then
        saved as the artifact's weights if they validate better than the best epoch (or without validation)."""
        net = self.swa.module
        norms = {m: m.momentum for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and any(p.requires_grad for p in m.parameters())}
        for m in norms:                # cumulative averages over the pass (torch's update_bn, trainable part only)
            m.reset_running_stats()
            m.momentum = None
        net.train()
        batches = self._cached_batches(feats, ytr, gen) if feats is not None else train_loader
        for x, _ in batches:
            x = x.to(self.dev, memory_format=torch.channels_last if x.dim() == 4 else torch.preserve_format)
            net.embed_features(x if feats is not None else net.frozen_features(x))
        for m, momentum in norms.items():
            m.momentum = momentum
        first = self.cfg.epochs - self.cfg.swa_epochs + 1
        row = {"best_epoch": f"swa {first}-{self.cfg.epochs}", "epoch": self.cfg.epochs}
        if validates:
            row.update(self._val_scores(self.validate(val_paths, val_feats, tf_eval, net), val_y))
        kept = not validates or row["val_log_loss"] < self.best
        self.console.print(f"SWA of epochs {first}-{self.cfg.epochs}: " + (
            f"validation log loss {row['val_log_loss']:.4f}, top-1 {row['val_top1']:.4f} vs best epoch {self.best:.4f}; "
            if validates else "") + ("kept" if kept else "not kept (the best epoch serves)"))
        if kept:
            artifact.save(self.out, net, self.taxonomy, row)

    def _val_scores(self, logits: dict[str, np.ndarray], val_y) -> dict[str, float]:
        """The per-epoch figures that choose the best weights (log.csv's val_log_loss, val_top1)."""
        probs = softmax(logits["joint"])
        from sklearn.metrics import log_loss
        return {"val_log_loss": float(log_loss(val_y, probs, labels=np.arange(len(self.taxonomy)))),
                "val_top1": float((answer(probs, self.taxonomy)[2] == val_y).mean())}

    @torch.no_grad()
    def validate(self, paths, feats, transform, net: HierNet | None = None) -> dict[str, np.ndarray]:
        """Per-epoch validation for choosing the best epoch: on the cached frozen features when there
        are some (the served figures come from the predictor in ``finish``)."""
        net = (net or self._eval_net()).eval()
        if feats is not None:
            batches = (feats[s:s + 128].to(self.dev).float() for s in range(0, len(feats), 128))
        else:
            batches = (net.frozen_features(x.to(self.dev))
                       for x, _ in loader(ImageDataset(paths, None, transform, net.cfg.img_size), 64,
                                          workers=self.cfg.workers))
        outs = []
        for f in batches:
            with torch.autocast(self.dev, dtype=self.amp_dtype, enabled=self.amp):
                outs.append({k: v.float().cpu().numpy() for k, v in net.heads(net.embed_features(f)).items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def _eval_net(self) -> HierNet:
        return self.ema.module if self.ema else self.model

    def _end_epoch(self, row: dict) -> None:
        self.history.append(row)
        if self.board is not None:
            for name, value in row.items():
                if name != "epoch":
                    self.board.add_scalar(name, value, row["epoch"])
            self.board.flush()

        def write_log(p: Path) -> None:
            with p.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(self.history[-1].keys()))
                w.writeheader()
                w.writerows(self.history)
        fileio.atomic_write(self.out / "log.csv", write_log)
        score = row.get("val_log_loss", -row["epoch"])     # no validation: the last epoch is the best
        if score < self.best:
            self.best = score
            artifact.save(self.out, self._eval_net(), self.taxonomy, {"best_epoch": row["epoch"], **row})
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "ema": self.ema.state_dict() if self.ema else None, "scaler": self.scaler.state_dict(),
                 "swa": self.swa.state_dict() if self.swa is not None else None,
                 "epoch": self.epoch, "updates": self.updates, "best": self.best, "history": self.history}
        fileio.atomic_write(self.out / CHECKPOINT, lambda p: _torch_save(state, p))

    def load_checkpoint(self) -> None:
        state = torch.load(self.out / CHECKPOINT, map_location=self.dev, weights_only=False)
        self.model.load_state_dict(state["model"])
        try:
            self.opt.load_state_dict(state["opt"])
        except ValueError:          # a checkpoint of an older hier: two parameter groups, not four
            warnings.warn(f"{self.out / CHECKPOINT} was written by an older hier: the run goes on from its weights "
                          "with a fresh optimizer state (AdamW moments restart)", HierWarning, stacklevel=2)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("swa") is not None:
            self.swa = AveragedModel(self.model)
            self.swa.load_state_dict(state["swa"])
        self.epoch, self.updates, self.best, self.history = (state["epoch"], state["updates"], state["best"],
                                                             state["history"])

    def finish(self, train_paths, train_y, val_paths, val_y) -> dict:
        """Reload the best weights, compute the class statistics that serve (``hier.models.statistics``)
        from the training photos, fit the temperature of the served scores on validation and store it
        with the metrics (and, beside them, the trained head's own figures on the same photos)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HierWarning)        # the best weights have no statistics yet
            best, _ = artifact.load(self.out, self.dev)
        files = {}
        with progress_bar(self.console) as progress:
            # by the predictor that will embed enrolled shots (same views, same TTA): one geometry
            z = Predictor(best, workers=self.cfg.workers)(train_paths, progress)["embedding"]
        t = time.time()
        if best.cfg.head == "statistics":
            stats = ClassStatistics.fit(z, [self.taxonomy.classes[i] for i in train_y], best.fingerprint())
            best.set_statistics(stats, self.taxonomy)
            files[STATISTICS] = stats.save
        else:                        # the trained head serves: enrollment maps prototypes into its frame
            means = class_means(z, np.asarray(train_y), len(self.taxonomy))
            files[PROTOTYPES] = lambda p: fileio.save_npy(p, means)
        statistics_s = time.time() - t
        if not len(val_paths):
            artifact.save(self.out, best, self.taxonomy, extra={"merged_classes": self.merged}, files=files)
            self._export()
            return {}
        # calibrate exactly what will be served: whole photos through the predictor, TTA as configured
        logits = Predictor(best, workers=self.cfg.workers)(val_paths)
        best.cfg.temperature = fit_temperature(logits["joint"], val_y)
        # held-out photos' embeddings: what enrollment sets each new class's score offset on
        files[VALIDATION] = lambda p: save_validation(p, logits["embedding"], val_y)
        files[OOF] = lambda p: save_oof(p, val_paths, val_y, logits["joint"], self.taxonomy.classes, self.data_dir)
        metrics = evaluate_probs(softmax(logits["joint"], best.cfg.temperature), val_y, self.taxonomy,
                                 logits=logits["joint"], heads=logits)
        if best.cfg.head == "statistics":
            head = evaluate_probs(softmax(logits["trained"], fit_temperature(logits["trained"], val_y)), val_y,
                                  self.taxonomy)
            metrics.update(trained_head_top1=head["top1"], trained_head_log_loss=head["log_loss"])
        metrics.update(head=best.cfg.head, statistics_s=round(statistics_s, 3), temperature=best.cfg.temperature,
                       best_epoch=artifact.read_config(self.out)["metrics"].get("best_epoch"))
        artifact.save(self.out, best, self.taxonomy, metrics, extra={"merged_classes": self.merged}, files=files)
        fileio.atomic_write(self.out / "metrics.json", lambda p: fileio.write_json(p, metrics))
        self._export()
        return metrics

    def _export(self) -> None:
        if self.cfg.export and onnx_providers():
            t = time.time()
            export(self.out)
            self.console.print(f"ONNX export for `hier predict`: {self.out / ONNX} ({time.time() - t:.0f} s)")


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file: given a name, its C++ writer turns a full disk into an opaque
    RuntimeError; a file object's write raises OSError(ENOSPC), which ``atomic_write`` reports."""
    with path.open("wb") as f:
        torch.save(obj, f)


def resume_invalidates(out: Path) -> list[str]:
    """What was made with the current weights and must be made again after a resumed run: the gallery's
    vectors (refused until rebuilt) and the ONNX export (written again by the next ``auto`` use)."""
    stale = []
    if (out / GALLERY / "index.faiss").is_file():
        stale.append(f"if its best weights change, {out}/{GALLERY} is refused until `hier index rebuild {out}`")
    if (out / ONNX).is_file():
        stale.append(f"if its best weights change, {out}/{ONNX} is written again on first use (or `hier export {out}`)")
    return stale


def merge_classes(images: ImageSet, pairs_csv: str) -> tuple[dict[str, str], int]:
    """Relabel the photos of each pair's second class as its first (both must have photos; a pair with
    one side absent is nothing to merge). Returns {merged class: class it is learned as} and how many
    pairs were not merged (a class without photos here: another competition's file, or a typo)."""
    from hier.competitions.hecto import load_equivalent_pairs

    present = set(images.labels)
    pairs = load_equivalent_pairs(pairs_csv)
    merged = {b: a for a, b in pairs if a in present and b in present and a != b}
    if set(merged) & set(merged.values()):
        raise HierError(f"{pairs_csv}: a class is merged into one and another into it; list each group once")
    images.labels = [merged.get(c, c) for c in images.labels]
    return merged, len(pairs) - len(merged)


def train(data_dir: str | Path, out: str | Path, taxonomy: Taxonomy | None = None,
          model_cfg: ModelConfig | None = None, cfg: TrainConfig | None = None, resume: bool = False,
          console: Console | None = None) -> dict:
    """Train on a folder-per-class dataset and write the artifact directory ``out``. With ``resume`` the
    run's saved settings (split included) are used; a given ``cfg`` only extends its ``epochs``. Under
    torchrun every rank runs this; rank 0 alone writes and prints."""
    world = distributed.world_from_env()
    with distributed.joined(world, distributed.device_for(world, torch.cuda.device_count())):
        console = console or Console(stderr=True)
        metrics = _train(data_dir, out, taxonomy, model_cfg, cfg, resume,
                         console if world.main else Console(quiet=True), world)
        distributed.barrier(world)       # every rank returns once rank 0 has written the whole artifact
        return metrics


def _train(data_dir, out, taxonomy, model_cfg, cfg, resume, console, world: World) -> dict:
    extend_to = cfg.epochs if cfg is not None else None
    model_cfg, cfg, out = model_cfg or ModelConfig(), cfg or TrainConfig(), Path(out)
    # a run stopped in its first epoch leaves train.json (and maybe log.csv), no checkpoint, no weights
    started = (out / "train.json").is_file() and not any((out / f).exists() for f in (CHECKPOINT, artifact.WEIGHTS))
    if resume and started:
        raise HierError(f"--resume: the run in {out} stopped before its first epoch ended, so there is "
                        "nothing to resume; run the same command without --resume to start it over")
    if resume and not (out / CHECKPOINT).is_file():
        raise HierError(f"--resume: no {CHECKPOINT} in {out}")
    if not resume and out.exists() and any(out.iterdir()):
        if not started:
            raise HierError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
        console.print(f"[yellow]{out} holds a run that stopped before its first epoch ended; starting over[/]")
        distributed.barrier(world)       # every rank has seen the folder as it was before it is cleared
        for name in ("train.json", "log.csv"):
            if world.main:
                (out / name).unlink(missing_ok=True)
    if resume:
        enrolled = [e["class"] for e in artifact.read_config(out).get("enrolled", [])] \
            if (out / artifact.CONFIG).is_file() else []
        if enrolled:
            raise HierError(f"{out} has {len(enrolled)} enrolled class(es) (e.g. {enrolled[0]!r}) whose rows were "
                            "made for the current weights; `hier unenroll` them first, or train into a new --out")
        saved = fileio.read_json(out / "train.json")
        model_cfg = ModelConfig.from_dict(saved["model"])
        cfg = TrainConfig(**{**saved["train"], "epochs": extend_to or saved["train"]["epochs"]})
        if taxonomy is None and (out / artifact.TAXONOMY).is_file():
            taxonomy = Taxonomy.from_csv(out / artifact.TAXONOMY)
    detector = CarDetector(cfg.detector) if cfg.crop == "yolo" else None     # a bad path fails before any work
    images, taxonomy = prepare(data_dir, taxonomy, cfg.layout)
    if cfg.exclude:
        from hier.audit import apply_exclude, read_exclude       # the audit's plotting stack, only when asked
        before = len(images.paths)
        images, absent = apply_exclude(images, read_exclude(cfg.exclude, data_dir))
        console.print(f"--exclude: {before - len(images.paths)} photo(s) left out" +
                      (f"; {absent} name(s) in {cfg.exclude} are not in {data_dir}" if absent else ""))
    merged, unmerged = merge_classes(images, cfg.merge_classes) if cfg.merge_classes else ({}, 0)
    if merged:
        taxonomy = taxonomy.subset([c for c in taxonomy.classes if c not in merged])
        console.print(f"--merge-classes: {len(merged)} class(es) learned as their equivalent "
                      f"(e.g. {next(iter(merged))!r} as {next(iter(merged.values()))!r})")
    if unmerged:
        console.print(f"[yellow]--merge-classes: {unmerged} pair(s) of {escape(str(cfg.merge_classes))} name a class "
                      f"with no photos in {escape(str(data_dir))}: not merged[/]")
    if resume and (out / artifact.TAXONOMY).is_file():     # the checkpoint's heads have a row per class
        run_classes = Taxonomy.from_csv(out / artifact.TAXONOMY).classes
        missing = [c for c in run_classes if c not in taxonomy]
        if missing:
            raise HierError(f"--resume: {len(missing)} of the run's {len(run_classes)} classes have no photos in {data_dir} "
                            f"(e.g. {missing[0]!r}); resume with the data the run was trained on")
    if detector:
        images.paths, rate = detector.crops(images.paths)
        console.print(f"car crops: {rate:.1%} of the photos had no vehicle box and are used whole")
    y = np.array([taxonomy.class_index[c] for c in images.labels])
    tr, va = split_indices(images.labels, cfg.val_frac, cfg.seed, cfg.fold, cfg.folds)
    torch.manual_seed(cfg.seed)
    model = HierNet(model_cfg, taxonomy, pretrained="none" if resume else cfg.pretrained)
    if not resume:
        from timm.data import resolve_model_data_config
        data_cfg = resolve_model_data_config(model.trunk)
        model.cfg.mean, model.cfg.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    run = {"model": model.cfg.to_dict(), "train": asdict(cfg), "data": str(data_dir), "merged_classes": merged,
           "world_size": world.size, "global_batch": cfg.batch_size * cfg.accum}
    trainer = Trainer(model, taxonomy, cfg, out, console, world, merged, data_dir)   # a batch that does not split: refused here
    distributed.barrier(world)           # every rank has checked the folder before rank 0 writes to it

    def write_run() -> None:
        if world.main:
            fileio.atomic_write(out / "train.json", lambda p: fileio.write_json(p, run))
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_run()          # first: a run stopped in its first epoch is recognised by it
    if images.skipped_message():
        trainer.console.print(f"[yellow]{images.skipped_message()}[/]")
    if resume:
        trainer.load_checkpoint()
        write_run()          # only once the checkpoint fits: a refused resume leaves train.json as it was
        for stale in resume_invalidates(out):
            trainer.console.print(f"[yellow]--resume changes the weights: {stale}[/]", soft_wrap=True)
    paths = images.paths
    return trainer.fit([paths[i] for i in tr], y[tr], [paths[i] for i in va], y[va])
