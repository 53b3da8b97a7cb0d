"""``hier enroll`` / ``hier unenroll``: classes added from a few photos, and taken back out."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from hier.cli.base import Command, app, artifact_argument, console, err, expand_globs, path_of


@app.command(cls=Command)
def enroll(
    artifact: Annotated[Path, artifact_argument("Artifact directory (rewritten atomically)")],
    name: Annotated[str, typer.Option("--class", help="Class name, e.g. 신형모델_2025")],
    images: Annotated[list[Path], typer.Option(
        help="Folder, image files or a glob of the new class's shots: --images shots/*.jpg", parser=path_of)],
    brand: Annotated[Optional[str], typer.Option(help="Default: the model's known brand or the parsed make")] = None,
    model: Annotated[Optional[str], typer.Option(help="Default: parsed from the class name")] = None,
    years: Annotated[Optional[str], typer.Option(help="e.g. 2025-2026; default: parsed from the name")] = None,
    add_shots: Annotated[bool, typer.Option(help="Allow adding photos to a base class")] = False,
    min_shots: Annotated[int, typer.Option(help="Refuse fewer shots than this")] = 1,
    calibrate: Annotated[float, typer.Option(
        help="TEEN strength toward similar base classes (artifacts served by their trained head; the "
             "statistical head calibrates every enrolled class by its own setting)")] = 0.0,
    max_base_drop: Annotated[Optional[float], typer.Option(
        help="Points of accuracy on the known classes' held-out photos this class may cost [default: "
             "hier.enrollment.MAX_BASE_DROP, the measured trade-off of docs/benchmarks/enroll.md]",
        show_default=False)] = None,
    more: Annotated[Optional[list[Path]], typer.Argument(
        hidden=True, parser=path_of,
        help="The rest of --images a.jpg b.jpg (what the shell makes of --images shots/*.jpg)")] = None,
):
    """Add a class from a few photos, no retraining; enrolling it again adds shots."""
    shots = expand_globs([*images, *(more or [])], "--images")      # before the heavy imports
    from hier.enrollment import OWN_SHOTS
    from hier.recognizer import Recognizer

    budget = {} if max_base_drop is None else {"max_base_drop": max_base_drop}
    r = Recognizer(artifact).enroll(name, shots, brand, model, years, add_shots, min_shots, calibrate, **budget)
    c = r.name
    console.print(r.summary(), markup=False, highlight=False, soft_wrap=True)
    if not r.added:
        return
    near, own = r.near_duplicate, r.own_shots_answered
    if near:
        x = escape(repr(near["class"]))
        err.print(f"[yellow]warning:[/] {escape(repr(c))} looks like a near-duplicate of class {x} (similarity "
                  f"{near['similarity']:.2f}); its offset costs it {r.offset_cost:.0%} of its own shots "
                  f"({own:.0%} of them are answered as it). If they are photos of {x}, "
                  f"`hier unenroll --class {escape(repr(c))}` and add them to it with --add-shots",
                  highlight=False, soft_wrap=True)
    elif not r.base and own < OWN_SHOTS:
        err.print(f"[yellow]warning:[/] {escape(repr(c))} is answered on only {own:.0%} of its own shots"
                  + (f"; its {_offset(r.offset)} costs it {r.offset_cost:.0%} of them"
                     if r.offset and r.offset > 0 else "") + "; more (and more varied) shots make it stronger",
                  highlight=False, soft_wrap=True)
    if not r.base and not r.calibrated:
        err.print("[yellow]warning:[/] this artifact has no validation.npz (trained by an older hier), so the "
                  "new class's scores are not offset and it may take photos of known classes; retrain to bound that")
    if r.head == "trained" and not r.mapped:
        err.print("[yellow]warning:[/] this artifact has no prototypes.npy (trained by an older hier), so the "
                  "shots were imprinted raw; retrain to enroll without hurting the base classes")


def _offset(offset: float) -> str:
    """A class's score offset in words: a positive one lowers its score, a negative one raises it."""
    return f"score offset {offset:.2f}" if offset >= 0 else f"score offset {offset:.2f}, raised"


@app.command()
def unenroll(
    artifact: Annotated[Path, artifact_argument()],
    name: Annotated[str, typer.Option("--class", help="An enrolled class")],
):
    """Remove an enrolled class, or the shots added to a base class (base classes stay)."""
    from hier.recognizer import Recognizer

    r = Recognizer(artifact).unenroll(name)
    if r.base:
        console.print(f"removed the added shots of base class {r.name!r}; it is as trained again", markup=False)
    else:
        console.print(f"removed {r.name!r}; {r.classes} classes now", markup=False)
