"""``hier index build/add/rebuild/remove/drop/merge/shards`` and ``hier similar``: the similar-listing gallery."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hier.cli.base import Format, app, artifact_argument, console, err, input_argument, input_option, print_frame
from hier.errors import HierError, check_number

index_app = typer.Typer(no_args_is_help=True, help="Build and edit the similar-listing FAISS index.")
app.add_typer(index_app, name="index")


def _listings(listings: Path, strict: bool, artifact: Path):
    from hier.gallery.listings import read_listings
    from hier.services.indexing import refuse_inside
    refuse_inside(listings, artifact)          # `hier index build ART ART` indexed the artifact's curves.png
    table = read_listings(listings, strict)
    if table.attrs.get("skipped"):
        err.print(f"[yellow]{table.attrs['skipped']}[/]")
    return table


@index_app.command("build")
def index_build(
    artifact: Annotated[Path, artifact_argument()],
    listings: Annotated[Optional[Path], input_argument(
        "Folder of listing photos, or CSV listing_id,image[,price,...]", "listings")] = None,
    kind: Annotated[str, typer.Option("--index", help="flat | ivf | hnsw | pq (millions: 60-byte codes in memory, "
                                      "re-ranked by float16 vectors on disk)")] = "flat",
    strict: Annotated[bool, typer.Option(help="Refuse unreadable photos in a folder instead of skipping them")] = False,
    from_embeddings: Annotated[Optional[Path], input_option(
        "Folder of `hier embed` shards: build from their vectors, without running the network")] = None,
):
    """Embed listing photos and (re)build ARTIFACT/gallery."""
    from hier.gallery.kinds import factory_string
    from hier.progress import progress_bar
    from hier.recognizer import Recognizer

    if (listings is None) == (from_embeddings is None):
        raise HierError("give LISTINGS (photos to embed) or --from-embeddings EMB/ (shards of `hier embed`), one of them")
    rec = Recognizer(artifact)
    factory_string(kind, 1)
    if from_embeddings is not None:
        from hier.services.embedding import build_gallery
        gallery = build_gallery(artifact, from_embeddings, kind)
        console.print(f"indexed {len(gallery)} listing image(s) ({kind}) from {from_embeddings} in {artifact}/gallery")
        return
    table = _listings(listings, strict, artifact)      # bad input stops here, before any progress output
    with progress_bar(err) as progress:
        gallery = rec.index(table, kind, progress)
    console.print(f"indexed {len(gallery)} listing image(s) ({kind}) in {artifact}/gallery")


@index_app.command("add")
def index_add(
    artifact: Annotated[Path, artifact_argument("Artifact directory with an index")],
    listings: Annotated[Path, input_argument("Folder or CSV of new listings", "listings")],
    strict: Annotated[bool, typer.Option(help="Refuse unreadable photos in a folder instead of skipping them")] = False,
    shard: Annotated[Optional[str], typer.Option(
        help="Shard to add to (created if new; `today`: the UTC date, e.g. 2025-03-07). Default: base")] = None,
):
    """Add listings to an existing index (ids of the others stay as they are); only their shard is rewritten."""
    from hier.gallery.shards import shard_name
    from hier.progress import progress_bar
    from hier.recognizer import Recognizer

    shard = shard_name(shard)
    rec = Recognizer(artifact)
    table = _listings(listings, strict, artifact)
    with progress_bar(err) as progress:
        added, gallery = rec.index_add(table, progress, shard)
    console.print(f"added {added} to shard {shard} ({len(gallery.shards[shard])}); {len(gallery)} in the index")


@index_app.command("rebuild")
def index_rebuild(
    artifact: Annotated[Path, artifact_argument("Artifact directory with an index")],
    kind: Annotated[str | None, typer.Option("--index", help="flat | ivf | hnsw | pq (default: the gallery's)")] = None,
):
    """Embed the gallery's listings again with the artifact's current weights (after `hier train --resume`)."""
    from hier.gallery.kinds import factory_string
    from hier.progress import progress_bar
    from hier.recognizer import Recognizer

    if kind is not None:
        factory_string(kind, 1)
    rec = Recognizer(artifact)
    with progress_bar(err) as progress:
        gallery = rec.index_rebuild(kind, progress)
    console.print(f"re-embedded {len(gallery)} listing image(s) ({gallery.kind}) in {artifact}/gallery")


@index_app.command("remove")
def index_remove(
    artifact: Annotated[Path, artifact_argument("Artifact directory with an index")],
    ids: Annotated[list[str], typer.Argument(help="listing_id values to remove")],
):
    """Remove listings by listing_id."""
    from hier.recognizer import Recognizer

    n, gallery = Recognizer(artifact).index_remove(ids)
    console.print(f"removed {n} vector(s); {len(gallery)} in the index")


@index_app.command("drop")
def index_drop(
    artifact: Annotated[Path, artifact_argument("Artifact directory with an index")],
    shard: Annotated[str, typer.Argument(help="Shard to drop whole (e.g. a day whose listings expired)")],
):
    """Drop a whole shard of the gallery (no index read or rewritten; the base shard is emptied)."""
    from hier.recognizer import Recognizer

    n, gallery = Recognizer(artifact).index_drop(shard)
    console.print(f"dropped shard {shard} ({n} listing image(s)); {len(gallery)} in the index")


@index_app.command("merge")
def index_merge(
    artifact: Annotated[Path, artifact_argument("Artifact directory with an index")],
    shards: Annotated[list[str], typer.Argument(help="Shards to merge")],
    into: Annotated[str, typer.Option("--into", help="Shard they become (new, one of them, or another)")],
):
    """Compact shards into one (IVF kinds: FAISS merge_from, nothing re-encoded or trained)."""
    from hier.recognizer import Recognizer

    n, gallery = Recognizer(artifact).index_merge(shards, into)
    console.print(f"merged {n} listing image(s) from {', '.join(s for s in shards if s != into)} into shard "
                  f"{into} ({len(gallery.shards[into])}); {len(gallery)} in the index")


@index_app.command("shards")
def index_shards(
    artifact: Annotated[Path, artifact_argument("Artifact directory with an index")],
    fmt: Annotated[Format, typer.Option("--format", help="table | json | csv")] = Format.table,
):
    """The gallery's shards and their listing images (from gallery.json; no index read)."""
    import pandas as pd

    from hier.gallery.store import shard_counts

    counts = shard_counts(artifact)
    print_frame(pd.DataFrame({"shard": list(counts), "listings": list(counts.values())}), fmt)


@app.command()
def similar(
    artifact: Annotated[Path, artifact_argument("Artifact directory with an index")],
    image: Annotated[Path, input_argument("Query photo", "photo")],
    k: Annotated[int, typer.Option("--k", help="How many listings")] = 10,
    same_brand: Annotated[bool, typer.Option(help="Only listings of the query's predicted brand")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="table | json | csv")] = Format.table,
):
    """Nearest listings to a photo: the seller's columns, hier's class and similarity."""
    from hier.gallery.listings import PREFIX
    from hier.recognizer import Recognizer

    check_number("--k", k, 1, integer=True)
    table = Recognizer(artifact).similar(image, k, same_brand)
    print_frame(table, fmt, as_written=tuple(c for c in table.columns if not str(c).startswith(PREFIX)))
