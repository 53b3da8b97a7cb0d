"""``hier audit``: duplicates, near-duplicates, outliers and unreadable files of a labelled dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hier.cli.base import app, artifact_option, console, err, input_argument


@app.command()
def audit(
    data: Annotated[Path, input_argument("Labelled photos: folder per class, or the AI-hub layout", "data folder")],
    out: Annotated[Path, typer.Option(help="Audit folder (audit.html, audit.json, PNGs, exclude.txt)")] = Path("audit"),
    artifact: Annotated[Optional[Path], artifact_option(
        "Artifact whose embeddings judge similarity (default: the offline ImageNet efficientnet_lite0)")] = None,
    layout: Annotated[str, typer.Option(help="auto | folder | aihub")] = "auto",
    near: Annotated[float, typer.Option(help="Embedding cosine from which two photos are near-duplicates")] = 0.93,
    outliers: Annotated[int, typer.Option(help="Photos on the outlier contact sheet")] = 48,
    exclude_outliers: Annotated[int, typer.Option(help="Also list the N most outlying photos for exclusion")] = 0,
    exclude_near: Annotated[bool, typer.Option(
        help="Also list both photos of every near-duplicate pair across classes for exclusion")] = False,
    write_exclude: Annotated[Optional[Path], typer.Option(
        help="Write the paths to drop (relative to DATA, one per line) to this file")] = None,
    force: Annotated[bool, typer.Option(help="Let --write-exclude replace an existing file")] = False,
    batch_size: Annotated[int, typer.Option()] = 64,
):
    """One HTML page on a dataset before training: per-class counts, sizes and brightness, exact
    duplicates (within and across classes), near-duplicates, outliers (a contact sheet), unreadable files."""
    from hier.audit import audit as run
    from hier.audit.find import PHASH_BITS
    from hier.progress import progress_bar

    with progress_bar(err) as progress:
        r = run(data, out, artifact, layout, near, outliers, exclude_outliers, exclude_near, write_exclude, force,
                batch_size, progress)
    c = r["counts"]
    if r["skipped"]:
        err.print(f"[yellow]{r['skipped']}[/]")
    console.print(f"{c['images']} photos in {c['classes']} classes: exact copies {c['exact_extra_copies']} beyond the "
                  f"first in {c['exact_groups']} within classes, {c['cross_class_groups']} across classes "
                  f"({c['cross_class_files']} photos); near-duplicate pairs {c['near_pairs']} (cosine >= {near} or pHash "
                  f"<= {PHASH_BITS} bits apart); outliers {c['outliers']}; unreadable files {c['unreadable']}",
                  highlight=False)
    alone = c["near_pairs_by_embedding_alone"]     # pairs pHash calls copies are copies whatever the embedding
    if artifact is not None and alone > c["images"] // 2:
        err.print(f"[yellow]warning:[/] {alone} near-duplicate pairs among {c['images']} photos by the embeddings "
                  f"alone: those of {artifact} may not tell these photos apart; try without --artifact (the ImageNet "
                  "trunk) or a higher --near", highlight=False, soft_wrap=True)
    console.print(f"wrote {out / 'audit.html'}" + (f" and {write_exclude} ({c['excluded']} paths)" if write_exclude else
                                                    f" ({c['excluded']} paths in exclude.txt)"), highlight=False)
