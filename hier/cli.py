"""``hier`` command line: train, evaluate, predict, enroll, index, similar, serve, report, demo (typer + rich).

User mistakes raise HierError; ``main`` prints them as one red line and exits 2, never a traceback.
"""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from hier.errors import HierError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-grained car recognition: brand, model and year that never contradict.")
console = Console(width=None if sys.stdout.isatty() else 160)   # pipes and CI logs get whole rows
err = Console(stderr=True)


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Folder-per-class training images: DATA/<class>/*.jpg")],
    out: Annotated[Path, typer.Option(help="Artifact directory to write")] = Path("runs/hier"),
    taxonomy: Annotated[Optional[Path], typer.Option(help="class,brand,model,year_start,year_end CSV "
                                                     "(default: parse the folder names)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Named flag set: 'cpu' or 'cpu-max' (see README)")] = None,
    model: Annotated[Optional[str], typer.Option(help="Any timm model name [efficientnet_lite0]")] = None,
    pretrained: Annotated[Optional[str], typer.Option(
        help="auto | none | timm (hub) | efficientnet_lite0 (offline package) | path to weights")] = None,
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
    ema: Annotated[Optional[bool], typer.Option("--ema/--no-ema")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision on CUDA")] = None,
    accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps [1]")] = None,
    val_frac: Annotated[Optional[float], typer.Option(help="Stratified validation share [0.2]")] = None,
    fold: Annotated[Optional[int], typer.Option(help="Use fold K of --folds as validation (k-fold)")] = None,
    folds: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers [0]")] = None,
    layout: Annotated[Optional[str], typer.Option(
        help="auto | folder (DATA/<class>/*.jpg) | aihub (<BR_brand>/<NNN_model>/<year_...>/*.jpg + JSON)")] = None,
    crop: Annotated[Optional[str], typer.Option(help="none | yolo: train on each photo's largest vehicle box")] = None,
    detector: Annotated[Optional[str], typer.Option(help="ultralytics detector weights for --crop yolo")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint")] = False,
):
    """Train a hierarchical model and write an artifact directory."""
    flags = {k: v for k, v in locals().items() if k not in ("data", "out", "taxonomy", "preset", "model", "resume")}
    from hier.recognizer import Recognizer

    rec = Recognizer.train(data, out, preset, taxonomy, resume, console=err, trunk=model, **flags)
    if rec.metrics:
        _print_metrics(rec.metrics, f"validation ({out})")
    console.print(f"artifact: {out}")


def _print_metrics(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and v is not None:
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


@app.command()
def evaluate(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory from `hier train`")],
    data: Annotated[Path, typer.Argument(help="Labelled photos: folder per class, or the AI-hub layout")],
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Add flipped views [artifact's setting]")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON")] = False,
    layout: Annotated[str, typer.Option(help="auto | folder | aihub")] = "auto",
):
    """Log loss, top-1/top-5, brand/model/full-path accuracy, inconsistency, ECE before/after T."""
    from hier.recognizer import Recognizer
    from hier.engine.trainer import progress_bar

    rec = Recognizer(artifact, batch_size=batch_size)
    with progress_bar(err) as progress:
        metrics = rec.evaluate(data, tta, progress, layout)
    skipped = metrics.pop("skipped")
    if skipped:
        err.print(f"[yellow]{skipped}[/]")
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_metrics(metrics, f"{artifact} on {data}")


@app.command()
def predict(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory")],
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Image files or folders, searched recursively (top-k mode)")] = None,
    test_csv: Annotated[Optional[Path], typer.Option(help="ID,img_path CSV (submission mode)")] = None,
    sample_submission: Annotated[Optional[Path], typer.Option(help="Gives the column and row order")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the submission / top-k CSV")] = None,
    topk: Annotated[int, typer.Option(help="Answers per image")] = 5,
    fmt: Annotated[Format, typer.Option("--format", help="table | json | csv")] = Format.table,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta",
                                                help="Add flipped views, geometric mean [artifact's setting]")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    strict: Annotated[bool, typer.Option(help="Refuse unreadable photos in folders instead of skipping them")] = False,
    crop: Annotated[str, typer.Option(help="none | yolo: answer on each photo's largest vehicle box")] = "none",
    detector: Annotated[Optional[Path], typer.Option(help="ultralytics detector weights for --crop yolo")] = None,
    backend: Annotated[str, typer.Option(help="auto (ONNX Runtime when `hier export` was run) | torch | onnx")] = "auto",
    explain: Annotated[Optional[Path], typer.Option(
        help="Also save each photo's class-activation map (top-1 answer) as DIR/<photo>.png")] = None,
):
    """Write a competition submission (--test-csv) or print top-k answers for images."""
    from hier.artifact import atomic_write
    from hier.data import image_files, read_test_csv
    from hier.recognizer import Recognizer
    from hier.engine.trainer import progress_bar

    if topk < 1:
        raise HierError(f"--topk must be at least 1, not {topk}")
    if (test_csv is None) == (not images):
        raise HierError("give either IMAGES... or --test-csv (with --sample-submission and --out)")
    if test_csv is not None and (sample_submission is None or out is None):
        raise HierError("--test-csv needs --sample-submission and --out")
    if out is not None and out.exists() and out.is_dir():
        raise HierError(f"--out {out} is a folder; give a file name")
    if explain is not None and (test_csv is not None or explain.is_file()):
        raise HierError("--explain DIR goes with IMAGES... and names a folder")
    if crop not in ("none", "yolo") or (crop == "yolo") != (detector is not None):
        raise HierError("--crop yolo goes with --detector PATH (ultralytics weights), --crop none without")
    rec = Recognizer(artifact, batch_size=batch_size, detector=detector, backend=backend)
    if test_csv is not None:
        inputs = read_test_csv(test_csv)                # checked before any progress output
        with progress_bar(err) as progress:
            table = rec.submission(inputs, sample_submission, out, tta, progress)
        console.print(f"wrote {out}: {len(table)} rows x {table.shape[1] - 1} classes")
        return
    photos = image_files(images, strict)               # checked before any progress output
    if photos.skipped_message():
        err.print(f"[yellow]{photos.skipped_message()}[/]")
    with progress_bar(err) as progress:
        answers = rec.predict(photos, topk, tta, progress).to_frame()     # checked once, above
    if out is not None:
        atomic_write(out, lambda p: answers.to_csv(p, index=False))
    _print_frame(answers, fmt)
    if explain is not None:
        err.print(f"saved {len(rec.explain(photos, explain))} activation map(s) in {explain}")
    if rec.crop_fallback is not None:
        err.print(f"car crops: {rec.crop_fallback:.1%} of the photos had no vehicle box and were used whole")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated data and the artifact")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option()] = 3,
    img_size: Annotated[int, typer.Option()] = 128,
    images_per_class: Annotated[int, typer.Option()] = 40,
):
    """Draw a small synthetic hierarchical car dataset, train on it (CPU, minutes) and predict."""
    from hier.demo import make_demo_dataset
    from hier.recognizer import Recognizer

    if out.exists() and any(out.iterdir()):
        raise HierError(f"{out} is not empty; choose another --out")
    data = make_demo_dataset(out / "data", images_per_class=images_per_class, img_size=img_size)
    held_out = make_demo_dataset(out / "eval", images_per_class=8, test_images_per_class=1, img_size=img_size,
                                 seed=1)
    console.print(f"[bold]1/4[/] drew {len(data.classes)} classes in {data.train_dir}")
    rec = Recognizer.train(data.train_dir, out / "artifact", taxonomy=data.taxonomy, console=err, img_size=img_size,
                           freeze_stages=3, epochs=epochs, cache_views=2, ema=False)
    console.print("[bold]2/4[/] evaluate on freshly drawn images")
    metrics = rec.evaluate(held_out.train_dir)
    metrics.pop("skipped")
    _print_metrics(metrics, f"{rec.path} on {held_out.train_dir}")
    console.print("[bold]3/4[/] submission")
    table = rec.submission(data.test_csv, data.sample_submission, out / "submission.csv")
    console.print(f"wrote {out / 'submission.csv'}: {len(table)} rows x {table.shape[1] - 1} classes")
    console.print("[bold]4/4[/] top-3 answers for two images")
    _print_frame(rec.predict(sorted((out / "data" / "test").glob("*.jpg"))[:2], topk=3).to_frame(), Format.table)


@app.command()
def enroll(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (rewritten atomically)")],
    name: Annotated[str, typer.Option("--class", help="Class name, e.g. 신형모델_2025")],
    images: Annotated[list[Path], typer.Option(help="Folder or image files of the new class's shots")],
    brand: Annotated[Optional[str], typer.Option(help="Default: the model's known brand or the parsed make")] = None,
    model: Annotated[Optional[str], typer.Option(help="Default: parsed from the class name")] = None,
    years: Annotated[Optional[str], typer.Option(help="e.g. 2025-2026; default: parsed from the name")] = None,
    add_shots: Annotated[bool, typer.Option(help="Allow adding photos to a base class")] = False,
    min_shots: Annotated[int, typer.Option(help="Refuse fewer shots than this")] = 1,
    calibrate: Annotated[float, typer.Option(help="TEEN calibration strength toward similar base classes")] = 0.0,
    max_base_drop: Annotated[float, typer.Option(
        help="Points of accuracy on the known classes' held-out photos this class may cost")] = 0.5,
):
    """Add a class from a few photos, no retraining; enrolling it again adds shots."""
    from hier.recognizer import Recognizer

    r = Recognizer(artifact).enroll(name, images, brand, model, years, add_shots, min_shots, calibrate,
                                    max_base_drop)
    if r["base"]:
        console.print(f"added {r['shots']} shot(s) to base class {r['class']!r} "
                      f"(`hier unenroll --class {r['class']!r}` takes them back out)")
    else:
        console.print(f"enrolled {r['class']!r} from {r['shots']} shot(s); {r['classes']} classes now"
                      + (f" (score offset {r['offset']:.2f}: expected to cost at most {max_base_drop:g} point(s) "
                         "of base accuracy)"
                         if r["offset"] is not None else ""))
    if not r["base"] and not r["calibrated"]:
        err.print("[yellow]warning:[/] this artifact has no validation.npz (trained by an older hier), so the "
                  "new class's scores are not offset and it may take photos of known classes; retrain to bound that")
    if not r["mapped"]:
        err.print("[yellow]warning:[/] this artifact has no prototypes.npy (trained by an older hier), so the "
                  "shots were imprinted raw; retrain to enroll without hurting the base classes")


@app.command()
def unenroll(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory")],
    name: Annotated[str, typer.Option("--class", help="An enrolled class")],
):
    """Remove an enrolled class, or the shots added to a base class (base classes stay)."""
    from hier.recognizer import Recognizer

    r = Recognizer(artifact).unenroll(name)
    if r["base"]:
        console.print(f"removed the added shots of base class {r['class']!r}; its trained row is back")
    else:
        console.print(f"removed {r['class']!r}; {r['classes']} classes now")


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
):
    """Write ARTIFACT/model.onnx (trunk + embedding, flip TTA inside): predict, evaluate, enroll and index
    then run on ONNX Runtime, with the same outputs to ~1e-6."""
    from hier.recognizer import Recognizer

    console.print(f"wrote {Recognizer(artifact).export(fmt)}")


@app.command("crop")
def crop_cmd(
    data: Annotated[Path, typer.Argument(help="Photos in any layout (folders are searched recursively)")],
    out: Annotated[Path, typer.Option(help="Where the cropped copies go (same tree)")],
    detector: Annotated[Path, typer.Option(help="ultralytics detector weights (.pt, .onnx, .tflite...)")],
):
    """Crop every photo to its largest car/bus/truck box (+8% margin); photos without one stay whole."""
    from hier.data.detect import CarDetector, crop_folder
    from hier.engine.trainer import progress_bar

    if not data.is_dir():
        raise HierError(f"data folder not found: {data}")
    found = CarDetector(detector)
    with progress_bar(err) as progress:
        r = crop_folder(data, out, found, progress)
    if r["skipped"]:
        err.print(f"[yellow]{r['skipped']}[/]")
    console.print(f"cropped {r['photos'] - r['fallback']} of {r['photos']} photo(s) into {out}; "
                  f"{r['fallback']} ({r['fallback_rate']:.1%}) had no vehicle box and were copied whole")


index_app = typer.Typer(no_args_is_help=True, help="Build and edit the similar-listing FAISS index.")
app.add_typer(index_app, name="index")


def _listings(listings: Path, strict: bool):
    from hier.index import read_listings
    table = read_listings(listings, strict)
    if table.attrs.get("skipped"):
        err.print(f"[yellow]{table.attrs['skipped']}[/]")
    return table


@index_app.command("build")
def index_build(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory")],
    listings: Annotated[Path, typer.Argument(help="Folder of listing photos, or CSV listing_id,image[,price,...]")],
    kind: Annotated[str, typer.Option("--index", help="flat | ivf | hnsw")] = "flat",
    strict: Annotated[bool, typer.Option(help="Refuse unreadable photos in a folder instead of skipping them")] = False,
):
    """Embed listing photos and (re)build ARTIFACT/gallery."""
    from hier.index import factory_string
    from hier.recognizer import Recognizer
    from hier.engine.trainer import progress_bar

    rec = Recognizer(artifact)
    factory_string(kind, 1)
    table = _listings(listings, strict)      # bad input stops here, before any progress output
    with progress_bar(err) as progress:
        gallery = rec.index(table, kind, progress)
    console.print(f"indexed {len(gallery)} listing image(s) ({kind}) in {artifact}/gallery")


@index_app.command("add")
def index_add(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory with an index")],
    listings: Annotated[Path, typer.Argument(help="Folder or CSV of new listings")],
    strict: Annotated[bool, typer.Option(help="Refuse unreadable photos in a folder instead of skipping them")] = False,
):
    """Add listings to an existing index (ids of the others stay as they are)."""
    from hier.recognizer import Recognizer
    from hier.engine.trainer import progress_bar

    rec = Recognizer(artifact)
    table = _listings(listings, strict)
    with progress_bar(err) as progress:
        added, gallery = rec.index_add(table, progress)
    console.print(f"added {added}; {len(gallery)} in the index")


@index_app.command("remove")
def index_remove(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory with an index")],
    ids: Annotated[list[str], typer.Argument(help="listing_id values to remove")],
):
    """Remove listings by listing_id."""
    from hier.recognizer import Recognizer

    n, gallery = Recognizer(artifact).index_remove(ids)
    console.print(f"removed {n} vector(s); {len(gallery)} in the index")


@app.command()
def similar(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory with an index")],
    image: Annotated[Path, typer.Argument(help="Query photo")],
    k: Annotated[int, typer.Option("--k", help="How many listings")] = 10,
    same_brand: Annotated[bool, typer.Option(help="Only listings of the query's predicted brand")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="table | json | csv")] = Format.table,
):
    """Nearest listings to a photo: the seller's columns, hier's class and similarity."""
    from hier.recognizer import Recognizer

    if k < 1:
        raise HierError(f"--k must be at least 1, not {k}")
    _print_frame(Recognizer(artifact).similar(image, k, same_brand), fmt)


@app.command()
def serve(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory")],
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted photo")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="Concurrent photos answered in one forward pass")] = 16,
):
    """HTTP API (/predict, /similar, /enroll, /health, /docs) and an upload page at /. /enroll needs
    the header X-Admin-Token equal to the HIER_ADMIN_TOKEN environment variable."""
    import socket

    import uvicorn

    from hier.recognizer import Recognizer
    from hier.serve import create_app

    rec = Recognizer(artifact)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise HierError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    err.print(f"serving {artifact} on http://{host}:{port} (API docs at /docs)")
    uvicorn.run(create_app(artifact, max_upload_mb, max_batch, recognizer=rec), host=host, port=port,
                log_level="warning")


@app.command()
def report(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory")],
    data: Annotated[Path, typer.Argument(help="Labelled photos: folder per class, or the AI-hub layout")],
    out: Annotated[Path, typer.Option(help="Report folder (index.html, PNGs, metrics.json)")] = Path("report"),
    layout: Annotated[str, typer.Option(help="auto | folder | aihub")] = "auto",
):
    """One HTML page: accuracy and log loss per level, worst classes, confused pairs, confusion
    matrices, reliability, coverage vs precision, class-activation maps."""
    from hier.recognizer import Recognizer
    from hier.engine.trainer import progress_bar

    rec = Recognizer(artifact)
    with progress_bar(err) as progress:
        m = rec.report(data, out, layout, progress)
    if m["skipped"]:
        err.print(f"[yellow]{m['skipped']}[/]")
    if m["unknown_class_images"]:
        err.print(f"[yellow]left out {m['unknown_class_images']} photo(s) of classes the artifact does not know[/]")
    console.print(f"wrote {out / 'index.html'}: {m['images']} photos, top-1 {m['top1']:.3f}, "
                  f"log loss {m['log_loss']:.3f}")


def _print_frame(frame, fmt: Format) -> None:
    if fmt is Format.json:
        print(frame.to_json(orient="records", force_ascii=False, indent=1))
    elif fmt is Format.csv:
        sys.stdout.write(frame.to_csv(index=False))
    else:
        table = Table()
        for col in frame.columns:
            table.add_column(str(col))
        for row in frame.itertuples(index=False):
            table.add_row(*[f"{v:.3f}" if isinstance(v, float) else Path(v).name if col == "image" else str(v)
                            for col, v in zip(frame.columns, row)])
        console.print(table)


def main() -> None:
    """Exit codes: 0 done, 2 a user error (one ``error:`` line), 130 interrupted (Ctrl-C), so
    ``hier train ... && hier predict ...`` never goes on after a failed or interrupted step."""
    try:
        code = app(standalone_mode=False)     # typer turns Ctrl-C into a returned 130, not an exception
        if isinstance(code, int) and code:
            if code == 130:
                err.print("[red]interrupted[/]")
            sys.exit(code)
    except HierError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except (typer.Exit, SystemExit):
        raise
    except Exception as e:
        # usage errors (missing argument, bad option) from click or typer's vendored copy of it
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()
            else:
                err.print(f"[red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise
