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
_WHOLE = r"0|-?[1-9][0-9]*"               # as Python writes an int: no sign '+' or "-0", no leading zero
_DECIMAL = r"-?(?:0|[1-9][0-9]*)\.[0-9]+"
JSON_SAFE = 2**53                          # a JavaScript client reads whole numbers below it exactly


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


def number_columns(table: pd.DataFrame) -> dict[str, type]:
    """The sellers' columns that are numbers: every non-empty cell written as Python writes that number
    back, so a JSON answer may carry it as a number, and a CSV writes it again, without changing a
    character of what the seller wrote.

    Args:
        table: listings as stored (cells as text, ``AS_GIVEN``).

    Returns:
        {column: int} where every cell is a whole number below 2**53 in size, {column: float} where every
        cell is a decimal that ``repr(float(cell))`` writes back unchanged. A column with one "007", "+3",
        "-0", "12.50", "1e3", "n/a", or whole numbers beside decimals ("3" would come back "3.0") stays
        text, and so do ``listing_id``, ``image`` and hier's own columns. One such cell added later makes
        its column text again for every listing.

    Example:
        >>> number_columns(pd.DataFrame({"listing_id": ["1"], "price": ["12000"], "zip": ["01234"]}))
        {'price': <class 'int'>}
    """
    out = {}
    for column in table.columns:
        cells = table[column].dropna()
        if column in ("listing_id", "image") or str(column).startswith(PREFIX) or not len(cells) \
                or not all(isinstance(c, str) for c in cells):
            continue
        cells = cells.astype(object)
        if cells.str.fullmatch(_WHOLE).all():
            if all(abs(int(c)) < JSON_SAFE for c in cells):
                out[column] = int
        elif cells.str.fullmatch(_DECIMAL).all() and all(repr(float(c)) == c for c in cells):
            out[column] = float
    return out


def as_numbers(rows: pd.DataFrame, numbers: dict[str, type]) -> pd.DataFrame:
    """``rows`` with the ``number_columns`` as numbers (whole numbers as ``Int64``, an empty cell missing)."""
    kinds = {c: "Int64" if kind is int else "float64" for c, kind in numbers.items() if c in rows}
    return rows.assign(**{c: pd.to_numeric(rows[c]).astype(kind) for c, kind in kinds.items()}) if kinds else rows


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
