"""``hier predict`` (top-k answers and competition submissions) and ``hier crop``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hier.cli.base import (
    Format,
    app,
    artifact_argument,
    console,
    err,
    expand_globs,
    input_argument,
    input_option,
    path_of,
    print_frame,
)
from hier.errors import HierError, check_number

MAX_BATCH = 4096          # photos per forward pass: more only fills memory


@app.command()
def predict(
    artifact: Annotated[Path, artifact_argument()],
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Image files or folders, searched recursively (top-k mode)", parser=path_of)] = None,
    test_csv: Annotated[Optional[Path], input_option(
        "ID,img_path CSV (submission mode: goes with --sample-submission and --out)")] = None,
    sample_submission: Annotated[Optional[Path], input_option("Gives the column and row order")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the submission / top-k CSV")] = None,
    topk: Annotated[int, typer.Option(help="Answers per image")] = 5,
    fmt: Annotated[Format, typer.Option("--format", help="table | json | csv")] = Format.table,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta",
                                                help="Add flipped views, geometric mean [artifact's setting]")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    strict: Annotated[bool, typer.Option(help="Refuse unreadable photos in folders instead of skipping them")] = False,
    crop: Annotated[str, typer.Option(help="none | yolo: answer on each photo's largest vehicle box")] = "none",
    detector: Annotated[Optional[Path], input_option("ultralytics detector weights for --crop yolo",
                                                       "detector weights")] = None,
    backend: Annotated[str, typer.Option(help="auto (model.onnx: OpenVINO f32 if installed, else ONNX Runtime) | "
                                         "torch | onnx | openvino (same file, f32; needs hier[openvino]) | "
                                         "openvino-bf16 | onnx-int8 (after `hier export --int8`); bf16 and int8 "
                                         "change answers")] = "auto",
    explain: Annotated[Optional[Path], typer.Option(
        help="Also save each photo's class-activation map (top-1 answer) as DIR/<photo>.png")] = None,
):
    """Write a competition submission (--test-csv) or print top-k answers for images."""
    from hier.outputs import output_file

    images = expand_globs(images or [], "IMAGES")      # every check before the heavy imports
    check_number("--topk", topk, 1, integer=True)
    check_number("--batch-size", batch_size, 1, MAX_BATCH, integer=True)
    if (test_csv is None) == (not images):
        raise HierError("give either IMAGES... or --test-csv (with --sample-submission and --out)")
    if test_csv is not None and (sample_submission is None or out is None):
        raise HierError("--test-csv needs --sample-submission and --out")
    if out is not None:                     # never an input, the artifact's own file, or a read-only folder
        output_file(out, [test_csv, sample_submission], {"artifact": artifact})
    if explain is not None and (test_csv is not None or explain.is_file()):
        raise HierError("--explain DIR goes with IMAGES... and names a folder")
    if crop not in ("none", "yolo") or (crop == "yolo") != (detector is not None):
        raise HierError("--crop yolo goes with --detector PATH (ultralytics weights), --crop none without")
    from hier.competitions.hecto import read_sample
    from hier.data import image_files, read_test_csv
    from hier.fileio import atomic_write
    from hier.progress import progress_bar
    from hier.recognizer import Recognizer

    rec = Recognizer(artifact, batch_size=batch_size, detector=detector, backend=backend)
    if explain is not None:
        rec.check_supports("explain")
    if test_csv is not None:
        inputs = read_test_csv(test_csv)                # checked before any progress output
        output_file(out, [p.path if hasattr(p, "path") else p for p in inputs.paths])   # nor a photo it lists
        sample = read_sample(sample_submission, inputs.ids, rec.taxonomy, rec.merged_classes)   # ... and before any prediction
        with progress_bar(err) as progress:
            table = rec.submission(inputs, sample, out, tta, progress)
        console.print(f"wrote {out}: {len(table)} rows x {table.shape[1] - 1} classes")
        return
    photos = image_files(images, strict)               # checked before any progress output
    if out is not None:
        output_file(out, [p.path if hasattr(p, "path") else p for p in photos.paths])   # nor a photo it reads
    if photos.skipped_message():
        err.print(f"[yellow]{photos.skipped_message()}[/]")
    with progress_bar(err) as progress:
        answers = rec.predict(photos, topk, tta, progress).to_frame()     # checked once, above
    if out is not None:
        atomic_write(out, lambda p: answers.to_csv(p, index=False, encoding="utf-8"))
    print_frame(answers, fmt)
    if explain is not None:
        err.print(f"saved {len(rec.explain(photos, explain))} activation map(s) in {explain}")
    if rec.crop_fallback is not None:
        err.print(f"car crops: {rec.crop_fallback:.1%} of the photos had no vehicle box and were used whole")


@app.command("crop")
def crop_cmd(
    data: Annotated[Path, input_argument("Photos in any layout (folders are searched recursively)", "data folder")],
    out: Annotated[Path, typer.Option(help="Where the cropped copies go (same tree)")],
    detector: Annotated[Path, input_option("ultralytics detector weights (.pt, .onnx, .tflite...)",
                                           "detector weights")],
):
    """Crop every photo to its largest car/bus/truck box (+8% margin); photos without one stay whole."""
    from hier.data.detect import CarDetector, crop_folder
    from hier.progress import progress_bar

    if not data.is_dir():
        raise HierError(f"data folder not found: {data}")
    found = CarDetector(detector)
    with progress_bar(err) as progress:
        r = crop_folder(data, out, found, progress)
    if r["skipped"]:
        err.print(f"[yellow]{r['skipped']}[/]")
    console.print(f"cropped {r['photos'] - r['fallback']} of {r['photos']} photo(s) into {out}; "
                  f"{r['fallback']} ({r['fallback_rate']:.1%}) had no vehicle box and were copied whole")
