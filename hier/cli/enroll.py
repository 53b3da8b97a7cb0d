"""``hier enroll`` / ``hier unenroll``: classes added from a few photos, and taken back out."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hier.cli.base import app, console, err


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
