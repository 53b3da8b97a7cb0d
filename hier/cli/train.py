"""``hier train``, ``evaluate``, ``demo`` and ``export``: making and judging an artifact."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hier.cli.base import (
    Format,
    app,
    artifact_argument,
    console,
    err,
    input_argument,
    input_option,
    print_frame,
    print_metrics,
)
from hier.errors import HierError, check_number

MAX_BATCH = 65536
DEMO_MIN_IMAGES = 5     # per class: the demo's stratified 20 % validation split needs one of each of its 12


@app.command()
def train(
    data: Annotated[Path, input_argument("Folder-per-class training images: DATA/<class>/*.jpg", "data folder")],
    out: Annotated[Path, typer.Option(help="Artifact directory to write")] = Path("runs/hier"),
    taxonomy: Annotated[Optional[Path], typer.Option(help="class,brand,model,year_start,year_end CSV, or "
                                                     "hecto2025 (shipped) (default: parse the folder names)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Named flag set: cpu | cpu-cached | cpu-max (docs: commands/train)")] = None,
    model: Annotated[Optional[str], typer.Option(help="Any timm model name [efficientnet_lite0]")] = None,
    pretrained: Annotated[Optional[str], typer.Option(
        help="auto | none | timm (hub) | efficientnet_lite0/1/2 (offline packages; auto picks them) | path to weights")] = None,
    img_size: Annotated[Optional[int], typer.Option(help="Square input size [224]")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option(help="Trunk learning rate [1e-3]")] = None,
    head_lr: Annotated[Optional[float], typer.Option(help="Embedding/head learning rate [3e-3]")] = None,
    freeze_stages: Annotated[Optional[int], typer.Option(help="Trunk stages kept frozen [0]")] = None,
    cache_views: Annotated[Optional[int], typer.Option(
        help="Precompute N augmented views of the frozen stages (needs --freeze-stages) [0]")] = None,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta",
                                                help="Calibrate and serve with flipped views too [off]")] = None,
    head: Annotated[Optional[str], typer.Option(
        help="What serves: statistics (LDA on class statistics, the same for enrolled classes) | trained "
             "(the trained cosine heads) [statistics]")] = None,
    ema: Annotated[Optional[bool], typer.Option("--ema/--no-ema")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision on CUDA")] = None,
    exclude: Annotated[Optional[str], typer.Option(
        help="File of photos not to train on, one path below DATA per line (`hier audit --write-exclude`)")] = None,
    export: Annotated[Optional[bool], typer.Option("--export/--no-export",
                                                   help="Write the ONNX export `hier predict` runs on [on]")] = None,
    accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps [1]")] = None,
    val_frac: Annotated[Optional[float], typer.Option(help="Stratified validation share [0.2]")] = None,
    fold: Annotated[Optional[int], typer.Option(help="Use fold K of --folds as validation (k-fold)")] = None,
    folds: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers [0]")] = None,
    layout: Annotated[Optional[str], typer.Option(
        help="auto | folder (DATA/<class>/*.jpg) | aihub (<BR_brand>/<NNN_model>/<year_...>/*.jpg + JSON)")] = None,
    crop: Annotated[Optional[str], typer.Option(help="none | yolo: train on each photo's largest vehicle box")] = None,
    detector: Annotated[Optional[str], input_option("ultralytics detector weights for --crop yolo",
                                                       "detector weights")] = None,
    aug: Annotated[Optional[str], typer.Option(help="Augmentation: none | light | seed | randaug [light]")] = None,
    mixup: Annotated[Optional[float], typer.Option(help="MixUp alpha on each batch [0: off]")] = None,
    cutmix: Annotated[Optional[float], typer.Option(help="CutMix alpha on each batch [0: off]")] = None,
    loss: Annotated[Optional[str], typer.Option(help="ce | focal | poly1 | penalty (confidence penalty) [ce]")] = None,
    smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing [0.1]")] = None,
    swa_epochs: Annotated[Optional[int], typer.Option(
        help="Average the weights of the last N epochs (kept if it validates better) [0]")] = None,
    layer_decay: Annotated[Optional[float], typer.Option(help="Layer-wise LR decay of the trunk, e.g. 0.85")] = None,
    low_res: Annotated[Optional[int], typer.Option(help="Progressive resizing: this size for the first epochs")] = None,
    low_res_epochs: Annotated[Optional[int], typer.Option(help="... for this many epochs, then --img-size")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option(
        "--tensorboard/--no-tensorboard", help="TensorBoard scalars in OUT/tensorboard")] = None,
    merge_classes: Annotated[Optional[str], typer.Option(
        help="class_a,class_b CSV of classes scored as one (a CSV, or hecto2025_equivalent: the pairs hier ships): learned as one, "
             "split evenly in submissions")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint")] = False,
):
    """Train a hierarchical model and write an artifact directory."""
    flags = {k: v for k, v in locals().items() if k not in ("data", "out", "taxonomy", "preset", "model", "resume")}
    from hier.outputs import writable_destination, writable_folder

    (writable_folder if out.is_dir() else writable_destination)(out, out)     # before the heavy imports
    from hier.artifact.files import METRICS
    from hier.recognizer import Recognizer
    from hier.training.distributed import world_from_env

    rec = Recognizer.train(data, out, preset, taxonomy, resume, console=err, trunk=model, **flags)
    if not world_from_env().main:        # under torchrun, rank 0 speaks for the run
        return
    m = rec.metrics
    if m:          # one figure: the answers `hier predict` gives, on the held-out photos; the rest in metrics.json
        console.print(f"validation: top-1 {m['top1']:.3f}, log loss {m['log_loss']:.3f} on {m['images']:,} held-out "
                      f"photos, as `hier predict` answers (the served head, fitted after the last epoch: the per-epoch "
                      f"val_* figures are the trained head's; every figure in {out / METRICS})", highlight=False,
                      soft_wrap=True)
    console.print(f"artifact: {out}")


@app.command()
def evaluate(
    artifact: Annotated[Path, artifact_argument("Artifact directory from `hier train`")],
    data: Annotated[Path, input_argument("Labelled photos: folder per class, or the AI-hub layout", "data folder")],
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Add flipped views [artifact's setting]")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    fmt: Annotated[Format, typer.Option("--format", help="table | json | csv")] = Format.table,
    as_json: Annotated[bool, typer.Option("--json", hidden=True, help="The same as --format json")] = False,
    layout: Annotated[str, typer.Option(help="auto | folder | aihub")] = "auto",
):
    """Log loss, top-1/top-5 and brand/model accuracy of the answers, ECE before/after T."""
    check_number("--batch-size", batch_size, 1, MAX_BATCH, integer=True)
    from hier.progress import progress_bar
    from hier.recognizer import Recognizer

    rec = Recognizer(artifact, batch_size=batch_size)
    with progress_bar(err) as progress:
        metrics = rec.evaluate(data, tta, progress, layout)
    skipped = metrics.pop("skipped")
    if skipped:
        err.print(f"[yellow]{skipped}[/]")
    if as_json or fmt is Format.json:
        print(json.dumps(metrics, indent=2))
    elif fmt is Format.csv:
        import pandas as pd
        print_frame(pd.DataFrame([metrics]), fmt)
    else:
        print_metrics(metrics, f"{artifact} on {data}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated data and the artifact")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option()] = 3,
    img_size: Annotated[int, typer.Option()] = 128,
    images_per_class: Annotated[int, typer.Option()] = 40,
):
    """Draw a small synthetic hierarchical car dataset, train on it (CPU, minutes) and predict."""
    check_number("--epochs", epochs, 1, 1000, integer=True)         # every check before anything is drawn
    check_number("--img-size", img_size, 32, 1024, integer=True)
    check_number("--images-per-class", images_per_class, DEMO_MIN_IMAGES, 1000, integer=True)
    from hier.data.demo import demo_folder, make_demo_dataset
    from hier.recognizer import Recognizer

    with demo_folder(out) as started_over:
        if started_over:
            err.print(f"[yellow]{out} held an unfinished demo run; starting over[/]")
        data = make_demo_dataset(out / "data", images_per_class=images_per_class, img_size=img_size)
        held_out = make_demo_dataset(out / "eval", images_per_class=8, test_images_per_class=1, img_size=img_size,
                                     seed=1)
        console.print(f"[bold]1/4[/] drew {len(data.classes)} classes in {data.train_dir}")
        rec = Recognizer.train(data.train_dir, out / "artifact", taxonomy=data.taxonomy, console=err, img_size=img_size,
                               freeze_stages=3, epochs=epochs, cache_views=2, ema=False)
        console.print("[bold]2/4[/] evaluate on freshly drawn images")
        metrics = rec.evaluate(held_out.train_dir)
        metrics.pop("skipped")
        print_metrics(metrics, f"{rec.path} on {held_out.train_dir}")
        console.print("[bold]3/4[/] submission")
        table = rec.submission(data.test_csv, data.sample_submission, out / "submission.csv")
        console.print(f"wrote {out / 'submission.csv'}: {len(table)} rows x {table.shape[1] - 1} classes")
        console.print("[bold]4/4[/] top-3 answers for two images")
        print_frame(rec.predict(sorted((out / "data" / "test").glob("*.jpg"))[:2], topk=3).to_frame(), Format.table)


@app.command()
def export(
    artifact: Annotated[Path, artifact_argument()],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx (static int8, calibrated on "
                                       "the training photos) for --backend onnx-int8, and measure what it changes")] = False,
    data: Annotated[Optional[Path], input_option("--int8: labelled photos to calibrate and measure on "
                                                 "[the artifact's training data, split as training split it]")] = None,
    photos: Annotated[int, typer.Option(help="--int8: training photos to calibrate on")] = 256,
    keep_float: Annotated[str, typer.Option(help="--int8: parts left in float, comma-separated: "
                                            "stem, head, last-conv, depthwise")] = "stem,head",
    reduce_range: Annotated[bool, typer.Option("--reduce-range/--full-range", help="--int8: 7-bit weights, "
                                               "ORT's remedy for AVX2 CPUs without VNNI [on]")] = True,
):
    """Write ARTIFACT/model.onnx (trunk + embedding, flip TTA inside): predict, evaluate, enroll and index
    then run on ONNX Runtime, with the same outputs to ~1e-6. --int8 adds model.int8.onnx and prints
    its change against fp32 on the validation photos (stored in config.json)."""
    from hier.export.int8 import INT8_TOLERANCE
    from hier.recognizer import Recognizer

    if not int8:
        if data is not None:
            raise HierError("--data goes with --int8")
        console.print(f"wrote {Recognizer(artifact).export(fmt)}")
        return
    check_number("--photos", photos, 1, integer=True)
    keep = tuple(k.strip() for k in keep_float.split(",") if k.strip())
    if not set(keep) <= {"stem", "head", "last-conv", "depthwise"}:
        raise HierError(f"--keep-float {keep_float!r}: choose among stem, head, last-conv, depthwise")
    r = Recognizer(artifact).export(fmt, int8=True, data=data, photos=photos, keep_float=keep,
                                    reduce_range=reduce_range)
    v = r["validation"]
    console.print(f"wrote {artifact / r['file']} (calibrated on {r['calibration_photos']} training photos, "
                  f"{', '.join(keep) or 'nothing'} in float)")
    console.print(f"int8 vs fp32 on {v['photos']} validation photos: top-1 {v['top1_fp32']:.4f} -> {v['top1']:.4f} "
                  f"({100 * v['top1_change']:+.1f} points), log loss {v['log_loss_fp32']:.4f} -> {v['log_loss']:.4f} "
                  f"({v['log_loss_change']:+.4f}), embedding cosine mean {v['cosine_mean']:.4f} min {v['cosine_min']:.4f}")
    if abs(v["top1_change"]) > INT8_TOLERANCE:
        err.print(f"[yellow]warning:[/] int8 changes top-1 by {100 * v['top1_change']:+.1f} points (more than "
                  f"{100 * INT8_TOLERANCE:.1f}): --backend onnx-int8 does not give fp32's answers; try "
                  "--keep-float stem,head,last-conv", highlight=False)
