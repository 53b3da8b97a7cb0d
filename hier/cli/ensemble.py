"""``hier ensemble``: several artifacts as one (weighted geometric mean, refitted temperature)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hier.cli.base import app, artifact_argument, console


@app.command()
def ensemble(
    members: Annotated[list[Path], artifact_argument("Member artifacts (e.g. the folds of one run, other recipes)")],
    out: Annotated[Path, typer.Option(help="Ensemble folder to write (absent or empty)")] = Path("runs/ensemble"),
    weights: Annotated[str, typer.Option(
        help="fit (on the members' out-of-fold scores; folds of one run weigh equally) | equal | w1,w2,...")] = "fit",
):
    """Combine artifacts into one that predict, evaluate, submissions and serve accept: each member's
    calibrated distribution, weighted geometric mean, temperature refitted on out-of-fold scores."""
    from hier.services.ensemble.build import build

    spec = build(members, out, weights)
    table = Table(title=f"out-of-fold figures ({spec['fitted']})")
    for col in ("member", "fold", "group", "weight", "T", "photos", "log loss", "top-1", "ECE"):
        table.add_column(col, justify="left" if col == "member" else "right")

    def cells(m: dict | None) -> list[str]:
        return [str(m["images"]), f"{m['log_loss']:.4f}", f"{m['top1']:.4f}", f"{m['ece']:.4f}"] if m else ["-"] * 4
    for m in spec["members"]:
        table.add_row(m["name"], "-" if m["fold"] is None else f"{m['fold']}/{m['folds']}", str(m["group"]),
                      f"{m['weight']:.3f}", f"{m['temperature']:.3f}", *cells(m["oof"]))
    oof = spec["oof"]
    table.add_row("[bold]ensemble[/]", "", "", "1", f"{spec['temperature']:.3f}", *cells(oof))
    if oof:
        table.add_row("ensemble, equal weights", "", "", "", "", "", f"{oof['equal_weights_log_loss']:.4f}", "", "")
    console.print(table)
    console.print(f"ensemble: {out}")
