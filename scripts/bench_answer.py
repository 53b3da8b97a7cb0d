"""Which reading of the one fine distribution is *the* answer: top-down (likeliest brand, its likeliest
model, that model's likeliest class: ``hier.metrics.answer``) or the flat argmax with its parents?

    python scripts/bench_answer.py ARTIFACT [ARTIFACT ...]

Each artifact is judged on its own validation split (rebuilt from its ``train.json``: the same data
folder, fraction, seed and fold), whole photos through its predictor as it serves. Prints, per artifact
and reading, top-1 and model/brand accuracy, and how many photos the two readings answer differently.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from benchlib import machine
from rich.console import Console
from rich.table import Table

from hier import Recognizer
from hier.artifact.files import TAXONOMY
from hier.artifact.records import read_run
from hier.data.split import SplitSettings, training_split
from hier.metrics import answer, path_of
from hier.taxonomy import Taxonomy


def validation_split(art: Path) -> tuple[list, list[str]]:
    """The photos ``hier train`` held out for validation: ``training_split`` of its saved settings."""
    run = read_run(art)
    return training_split(run["data"], Taxonomy.from_csv(art / TAXONOMY), SplitSettings.of(run["train"], run)).part("val")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    args = ap.parse_args()
    rows = []
    for art in args.artifacts:
        paths, labels = validation_split(art)
        rec = Recognizer(art)
        out, snap = rec._embed(paths)
        tax = snap.taxonomy
        y = np.array([tax.class_index[c] for c in labels])
        readings = {"top-down (shipped)": answer(out["probs"], tax),
                    "flat argmax + its parents": path_of(out["probs"].argmax(1), tax)}
        for name, (brand, model, fine) in readings.items():
            rows.append({"artifact": art.name if art.name != "base" else str(art.parent.name), "photos": len(y),
                         "reading": name, "top1": float((fine == y).mean()),
                         "model_acc": float((model == tax.fine_to_model[y]).mean()),
                         "brand_acc": float((brand == tax.fine_to_brand[y]).mean()),
                         "differ": int((out["probs"].argmax(1) != readings["top-down (shipped)"][2]).sum())})
    table = Table(title="The answer: two readings of one distribution, on each artifact's validation split")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)
    print(json.dumps({"rows": rows, **machine()}, indent=1))


if __name__ == "__main__":
    main()
