"""Fit a HierNet: AdamW + warmup/cosine (timm scheduler), EMA, AMP on CUDA, gradient accumulation,
best checkpoint by validation log loss, resume, temperature scaling at the end; on one process or as
one rank of ``torchrun`` (``hier.training.distributed``: DDP, rank 0 validates and writes).

With ``freeze_stages`` > 0 and ``cache_views`` > 0 the frozen stem runs once per augmented view
before training and the trainable tail learns from the cached activations: on a CPU this is what
makes fine-tuning a real trunk fit in minutes.
"""
from __future__ import annotations

import csv
import io
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler

from hier import artifact, fileio
from hier.artifact.files import CHECKPOINT, CURVES, LOG
from hier.data import ImageDataset, eval_transform, loader
from hier.errors import HierError, HierWarning
from hier.metrics import answer, softmax
from hier.models import HierNet, HierTask
from hier.progress import progress_bar
from hier.taxonomy import Taxonomy
from hier.training import distributed
from hier.training.config import TrainConfig
from hier.training.curves import plot_curves
from hier.training.distributed import World
from hier.training.finish import finish


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
        if cfg.cache_views > 0 and model.cfg.freeze_stages > 0 and cfg.low_res:
            raise HierError("--low-res trains on photos, not on cached frozen-stage maps: add --cache-views 0")
        if cfg.low_res >= model.cfg.img_size:
            raise HierError(f"--low-res {cfg.low_res} must be below --img-size {model.cfg.img_size} (the first epochs "
                            "train on smaller photos; --low-res 0 --low-res-epochs 0 trains at one size)")
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
        # channels-last on CUDA and on CPU alike: oneDNN's convolutions train faster in it on a CPU too
        # (docs/benchmarks/recipe.md, speed levers)
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
            plot_curves(self.history, self.out / CURVES)
        return finish(self, train_paths, train_y, val_paths, val_y)

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
        fileio.atomic_write(self.out / LOG, write_log)
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

def _torch_save(obj, path: Path) -> None:
    """torch.save into memory, then the bytes written by Python: torch's own writer turns a full disk
    into an opaque ``RuntimeError: [enforce fail ...]`` (to a file object too), Python's write raises
    OSError(ENOSPC), which ``atomic_write`` reports in one line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())
