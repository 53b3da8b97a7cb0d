"""``hier train``'s run: the folder checks, the training split, resume, and the trainer on every rank."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from hier import artifact
from hier.artifact.files import CHECKPOINT, GALLERY, LOG, ONNX, TAXONOMY, TRAIN_RUN, WEIGHTS
from hier.artifact.records import read_run, write_run
from hier.data.exclude import exclude_names
from hier.data.split import SplitSettings, training_split
from hier.errors import HierError
from hier.outputs import make_folder
from hier.gallery import store as gallery_store
from hier.models import HierNet, ModelConfig
from hier.taxonomy import Taxonomy
from hier.training import distributed
from hier.training.config import TrainConfig
from hier.training.distributed import World
from hier.training.trainer import Trainer


def resume_invalidates(out: Path) -> list[str]:
    """What was made with the current weights and must be made again after a resumed run: the gallery's
    vectors (refused until rebuilt) and the ONNX export (written again by the next ``auto`` use)."""
    stale = []
    if gallery_store.exists(out):
        stale.append(f"if its best weights change, {out}/{GALLERY} is refused until `hier index rebuild {out}`")
    if (out / ONNX).is_file():
        stale.append(f"if its best weights change, {out}/{ONNX} is written again on first use (or `hier export {out}`)")
    return stale


def train(data_dir: str | Path, out: str | Path, taxonomy: Taxonomy | None = None,
          model_cfg: ModelConfig | None = None, cfg: TrainConfig | None = None, resume: bool = False,
          console: Console | None = None) -> dict:
    """Train on a folder-per-class dataset and write the artifact directory ``out``. With ``resume`` the
    run's saved settings (split included) are used; a given ``cfg`` only extends its ``epochs``. Under
    torchrun every rank runs this; rank 0 alone writes and prints."""
    world = distributed.world_from_env()
    try:
        with distributed.joined(world, distributed.device_for(world, torch.cuda.device_count())):
            console = console or Console(stderr=True)
            metrics = _train(data_dir, out, taxonomy, model_cfg, cfg, resume,
                             console if world.main else Console(quiet=True), world)
            distributed.barrier(world)       # every rank returns once rank 0 has written the whole artifact
            return metrics
    except RuntimeError as e:            # another rank is gone: one line here, not a C++ collective's traceback
        if not (world.distributed and distributed.peer_lost(e)):
            raise
        raise HierError(f"rank {world.rank}: another process of this torchrun launch stopped "
                        f"({str(e).splitlines()[0][:100]}); the run ends here (`--resume` continues it from its "
                        "last epoch)") from None


def _train(data_dir, out, taxonomy, model_cfg, cfg, resume, console, world: World) -> dict:
    extend_to = cfg.epochs if cfg is not None else None
    model_cfg, cfg, out = model_cfg or ModelConfig(), cfg or TrainConfig(), Path(out)
    # a run stopped in its first epoch leaves train.json (and maybe log.csv), no checkpoint, no weights
    started = (out / TRAIN_RUN).is_file() and not any((out / f).exists() for f in (CHECKPOINT, WEIGHTS))
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
        for name in (TRAIN_RUN, LOG):
            if world.main:
                (out / name).unlink(missing_ok=True)
    if resume:
        enrolled = [e["class"] for e in artifact.read_config(out).get("enrolled", [])] \
            if (out / artifact.CONFIG).is_file() else []
        if enrolled:
            raise HierError(f"{out} has {len(enrolled)} enrolled class(es) (e.g. {enrolled[0]!r}) whose rows were "
                            "made for the current weights; `hier unenroll` them first, or train into a new --out")
        saved = read_run(out)
        model_cfg = ModelConfig.from_dict(saved["model"])
        cfg = TrainConfig(**{**saved["train"], "epochs": extend_to or saved["train"]["epochs"]})
        if taxonomy is None and (out / TAXONOMY).is_file():
            taxonomy = Taxonomy.from_csv(out / TAXONOMY)
    run_classes = Taxonomy.from_csv(out / TAXONOMY).classes if resume and (out / TAXONOMY).is_file() else None
    settings = SplitSettings.of(cfg, saved if resume else None)     # a resumed run: its own exclude list
    if resume and cfg.exclude and settings.exclude_names is not None and Path(cfg.exclude).is_file() and \
            exclude_names(cfg.exclude) != list(settings.exclude_names):
        console.print(f"[yellow]--exclude {escape(str(cfg.exclude))} changed since the run started; the run goes on "
                      f"with the list it started with ({len(settings.exclude_names)} name(s)), so its split "
                      "is the saved one[/]")
    given = taxonomy
    split = training_split(data_dir, taxonomy, settings, required=run_classes)   # the heads' rows
    images, taxonomy, merged = split.images, split.taxonomy, split.merged
    if cfg.exclude:
        console.print(f"--exclude: {split.excluded} photo(s) left out" +
                      (f"; {split.absent} name(s) in {cfg.exclude} are not in {data_dir}" if split.absent else ""))
    if merged:
        console.print(f"--merge-classes: {len(merged)} class(es) learned as their equivalent "
                      f"(e.g. {next(iter(merged))!r} as {next(iter(merged.values()))!r})")
    if split.unmerged:
        console.print(f"[yellow]--merge-classes: {split.unmerged} pair(s) of {escape(str(cfg.merge_classes))} name a "
                      f"class with no photos in {escape(str(data_dir))}: not merged[/]")
    if split.crop_fallback is not None:
        console.print(f"car crops: {split.crop_fallback:.1%} of the photos had no vehicle box and are used whole")
    y = np.array([taxonomy.class_index[c] for c in images.labels])
    tr, va = split.train, split.val
    torch.manual_seed(cfg.seed)
    model = HierNet(model_cfg, taxonomy, pretrained="none" if resume else cfg.pretrained)
    if not resume:
        from timm.data import resolve_model_data_config
        data_cfg = resolve_model_data_config(model.trunk)
        model.cfg.mean, model.cfg.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    run = {"model": model.cfg.to_dict(), "train": asdict(cfg), "data": str(data_dir), "merged_classes": merged,
           "world_size": world.size, "global_batch": cfg.batch_size * cfg.accum}
    if cfg.exclude:                   # the list as read now: a resumed run splits as this one did
        run["exclude_names"] = list(settings.exclude_names) if settings.exclude_names is not None else \
            exclude_names(cfg.exclude)
    trainer = Trainer(model, taxonomy, cfg, out, console, world, merged, data_dir)   # a batch that does not split: refused here
    _summary(console, data_dir, settings, split, given, model.cfg, cfg, trainer.dev)
    distributed.barrier(world)           # every rank has checked the folder before rank 0 writes to it

    def record_run() -> None:
        if world.main:
            write_run(out, run)
    if world.main:
        make_folder(out, out)
    if not resume:
        record_run()          # first: a run stopped in its first epoch is recognised by it
    if images.skipped_message():
        trainer.console.print(f"[yellow]{images.skipped_message()}[/]")
    if resume:
        trainer.load_checkpoint()
        record_run()          # only once the checkpoint fits: a refused resume leaves train.json as it was
        for stale in resume_invalidates(out):
            trainer.console.print(f"[yellow]--resume changes the weights: {stale}[/]", soft_wrap=True)
    paths = images.paths
    return trainer.fit([paths[i] for i in tr], y[tr], [paths[i] for i in va], y[va])


def _summary(console, data_dir, settings, split, given: Taxonomy | None, model_cfg: ModelConfig, cfg: TrainConfig,
             device: str) -> None:
    """What the run is about to do, before its first epoch: the photos it read and how they split, the
    taxonomy classes it has no photos for, and the model and schedule."""
    classes = len(split.taxonomy)
    console.print(f"data: {data_dir} (layout {settings.layout}): {len(split.images.paths):,} photos of {classes} "
                  f"classes, {len(split.train):,} to train on and {len(split.val):,} to validate on", soft_wrap=True,
                  markup=False, highlight=False)
    tax = split.taxonomy
    if given is None and len(tax.brands) == len(tax.models) > 1:        # e.g. Hecto's names: no make in them
        console.print(f"taxonomy: parsed from the folder names, every one of the {len(tax.models)} models its own "
                      "brand (the names hold no make); give --taxonomy (a CSV, or hecto2025) for a brand level",
                      markup=False, highlight=False, soft_wrap=True)
    if given is not None and len(given) > classes:
        console.print(f"taxonomy: {len(given) - classes} of its {len(given)} classes have no photos here and are "
                      "left out of this model", markup=False, highlight=False, soft_wrap=True)
    low = f", the first {cfg.low_res_epochs} at {cfg.low_res} px" if cfg.low_res_epochs else ""
    start = "random weights" if cfg.pretrained == "none" else f"{cfg.pretrained} weights"
    console.print(f"model: {model_cfg.trunk} ({start}), {model_cfg.img_size} px, {cfg.epochs} epochs"
                  f"{low}, batch {cfg.batch_size}, on {device} with {torch.get_num_threads()} threads",
                  markup=False, highlight=False, soft_wrap=True)


def check_resume_flags(out: Path, preset, taxonomy, flags: dict) -> None:
    """``--resume`` continues a run with its saved settings: repeating them is fine, changing one (other
    than a larger ``--epochs``) is refused rather than silently ignored."""
    if preset is not None or taxonomy is not None:
        raise HierError("--resume uses the run's saved settings and taxonomy; drop --preset / --taxonomy")
    saved = read_run(out) or {"model": {}, "train": {}}
    for key, value in flags.items():
        if key == "epochs":
            continue
        was = saved["model"].get(key, saved["train"].get(key, value))
        if was != value:
            raise HierError(f"--resume keeps the run's saved settings: --{key.replace('_', '-')} {value} differs "
                            f"from the saved {was}; train into a new --out to change it")
