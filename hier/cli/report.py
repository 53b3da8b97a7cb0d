"""``hier report``: the HTML page judging an artifact on labelled photos."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hier.cli.base import app, artifact_argument, console, err, input_argument


@app.command()
def report(
    artifact: Annotated[Path, artifact_argument()],
    data: Annotated[Path, input_argument("Labelled photos: folder per class, or the AI-hub layout", "data folder")],
    out: Annotated[Path, typer.Option(help="Report folder (index.html, PNGs, metrics.json)")] = Path("report"),
    layout: Annotated[str, typer.Option(help="auto | folder | aihub")] = "auto",
):
    """One HTML page: accuracy and log loss per level, worst classes, confused pairs, confusion
    matrices, reliability, coverage vs precision, class-activation maps."""
    from hier.progress import progress_bar
    from hier.recognizer import Recognizer

    rec = Recognizer(artifact)
    with progress_bar(err) as progress:
        m = rec.report(data, out, layout, progress)
    if m["skipped"]:
        err.print(f"[yellow]{m['skipped']}[/]")
    if m["unknown_class_images"]:
        err.print(f"[yellow]left out {m['unknown_class_images']} photo(s) of classes the artifact does not know[/]")
    if m["in_training_folder"]:
        err.print(f"[yellow]warning:[/] {m['in_training_folder']} of the {m['images']} photos are in the folder "
                  f"{artifact} was trained from: the figures flatter it; judge it on photos it never saw", highlight=False,
                  soft_wrap=True)
    console.print(f"wrote {out / 'index.html'}: {m['images']} photos, top-1 {m['top1']:.3f}, "
                  f"log loss {m['log_loss']:.3f}")
