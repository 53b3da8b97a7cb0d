"""``hier embed``: listing photos to Parquet shards of embeddings, one shard per machine."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hier.cli.base import app, artifact_argument, console, err, input_argument
from hier.errors import check_number


@app.command()
def embed(
    artifact: Annotated[Path, artifact_argument()],
    listings: Annotated[Path, input_argument("Folder of listing photos, or CSV listing_id,image[,price,...]",
                                             "listings")],
    out: Annotated[Path, typer.Option(help="Folder of the Parquet shards (part-i-of-N.parquet)")],
    shard: Annotated[str, typer.Option(help="i/N: embed every N-th listing from the i-th (one machine of N)")] = "0/1",
    backend: Annotated[str, typer.Option(help="auto | torch | onnx")] = "auto",
    batch_size: Annotated[int, typer.Option()] = 64,
    workers: Annotated[Optional[int], typer.Option(
        help="Photo decoding processes beside the network [one per spare core, at most 4]")] = None,
    strict: Annotated[bool, typer.Option(help="Refuse unreadable photos in a folder instead of skipping them")] = False,
):
    """Embed listing photos into Parquet shards; `hier index build ARTIFACT --from-embeddings OUT` makes the
    gallery from them without running the network again."""
    check_number("--batch-size", batch_size, 1, 65536, integer=True)
    if workers is not None:
        check_number("--workers", workers, 0, 256, integer=True)
    from hier.cli.index import _listings
    from hier.progress import progress_bar
    from hier.services.embedding import embed as embed_shard
    from hier.services.embedding import parse_shard

    where = parse_shard(shard)
    table = _listings(listings, strict, artifact)
    with progress_bar(err) as progress:
        path = embed_shard(artifact, table, out, where, backend, batch_size, workers, progress)
    console.print(f"wrote {path}")
