"""The listings table: sellers' listings read and checked (``read_listings``), their cells kept as given,
and hier's own columns beside them (``hier_*``: FAISS id, predicted class/brand/model, similarity), a
prefix listings may not use."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hier.data import first_repeat, image_files, read_table, refuse_listed, require_cells
from hier.errors import HierError
from hier.metrics import answer, path_of

PREFIX = "hier_"                       # hier's own listing columns; reserved in users' listings
ID, CLASS, BRAND, MODEL, SIMILARITY = (PREFIX + c for c in ("id", "class", "brand", "model", "similarity"))
# Sellers' cells come back as written, as text ("01234" stays "01234"): only an empty cell is missing
# ("n/a", "NA", "null" stay text).
AS_GIVEN = dict(dtype=str, keep_default_na=False, na_values=[""])


def label_columns(probs: np.ndarray, taxonomy) -> dict:
    """hier_class / hier_brand / hier_model of listings from their fine-class probabilities (*the*
    answer, as ``similar --same-brand`` reads the query's)."""
    return answer_columns(answer(probs, taxonomy)[2], taxonomy)


def answer_columns(fine: np.ndarray, taxonomy) -> dict:
    """hier_class / hier_brand / hier_model of listings from their answers' fine classes."""
    brand, model, fine = path_of(fine, taxonomy)
    return {CLASS: np.asarray(taxonomy.classes, dtype=object)[fine],
            BRAND: np.asarray(taxonomy.brands, dtype=object)[brand],
            MODEL: np.asarray(taxonomy.models, dtype=object)[model]}


def read_listings(listings: Path, strict: bool = False) -> pd.DataFrame:
    """A folder of photos, searched recursively, symlinked folders included (listing_id = path below it
    without the extension), or a CSV ``listing_id,image[,price,...]`` (``read_table``), checked: images
    exist and decode, ids are unique (a repeat names both files, or both rows), no column uses hier's
    reserved prefix. In a folder, unusable files are skipped (``table.attrs["skipped"]`` says how many)
    unless ``strict``."""
    if listings.is_dir():
        found = image_files([listings], strict)
        table = pd.DataFrame({"listing_id": [p.relative_to(listings).with_suffix("").as_posix() for p in found.paths],
                              "image": [str(p) for p in found.paths]})
        table.attrs["skipped"] = found.skipped_message()
        repeat = first_repeat(table["listing_id"])
        if repeat:
            a, b = (found.paths[i].relative_to(listings).as_posix() for i in repeat[1:])
            raise HierError(f"listing_id {repeat[0]!r} repeats in {listings}: {a} and {b} (a folder's listing_id "
                            "is the file's path without its extension); rename one, or give a CSV "
                            "listing_id,image")
    elif listings.is_file():
        table = read_table(listings, "listings CSV", ["listing_id", "image"], AS_GIVEN["dtype"])
        reserved = [c for c in table.columns if str(c).startswith(PREFIX)]
        if reserved:
            raise HierError(f"{listings}: column {reserved[0]!r} uses the prefix {PREFIX!r}, which hier keeps for "
                            "its own columns; rename it")
        require_cells(table, ["listing_id", "image"], listings)
        repeat = first_repeat(table["listing_id"])
        if repeat:
            raise HierError(f"{listings}: listing_id {repeat[0]!r} repeats (rows {repeat[1] + 2} and {repeat[2] + 2})")
        table["image"] = [str((listings.parent / p).resolve()) for p in table["image"]]
        refuse_listed([Path(p) for p in table["image"]], listings)
    else:
        raise HierError(f"listings not found: {listings}")
    return table
