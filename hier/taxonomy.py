"""Class taxonomy: fine class -> model -> brand, with year ranges.

The taxonomy is data (a CSV per dataset in ``registry/``), never code. ``Taxonomy`` turns it into the
integer maps the model's heads use (``fine_to_model``, ``model_to_brand``) and the marginal sums that
make brand/model answers consistent with the fine-class distribution.
"""
from __future__ import annotations

import csv
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hier.errors import HierError

COLUMNS = ["class", "brand", "model", "year_start", "year_end"]
REGISTRY = Path(__file__).resolve().parent / "registry"      # package data: hecto2025.csv, its equivalent pairs

_YEAR = re.compile(r"^(19|20)\d\d$")
YEARS = (1886, 2100)          # the first car to a model year far enough ahead for any announcement
NAME_COLUMNS = ("class", "brand", "model")
_ESCAPED = re.compile("[\udc80-\udcff]")


def nfc(name: str | None) -> str | None:
    """The one spelling of a class, brand or model name. macOS writes folder names in NFD (한 as
    ㅎ+ㅏ+ㄴ), CSVs and typed names are NFC: both must be the same class. Under an ASCII locale Python
    hands over argv and folder names as surrogate-escaped bytes (신 as '\\udceb...'): UTF-8 bytes are
    decoded back, so ``--class 신형모델_2025`` is the same name whatever the locale."""
    if not isinstance(name, str):
        return name
    if _ESCAPED.search(name):
        try:
            name = os.fsencode(name).decode("utf-8")
        except (UnicodeError, ValueError):
            pass                              # not UTF-8: ``check_name`` refuses what is left
    return unicodedata.normalize("NFC", name)


def check_name(what: str, name: str) -> str:
    """A new class, brand or model name that can be stored and typed again, else HierError: not empty,
    no control characters or line breaks (a CSV cell, a terminal, a folder cannot all carry them),
    no spaces around it (``'Nova '`` and ``'Nova'`` would be two models nobody can tell apart), valid
    Unicode (``nfc`` first)."""
    if not isinstance(name, str) or not name.strip():
        raise HierError(f"{what} must not be empty, not {name!r}")
    if name != name.strip():
        raise HierError(f"{what} {name!r} starts or ends with spaces; give it without them")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)
    if bad is not None:
        why = "bytes that are not UTF-8" if unicodedata.category(bad) == "Cs" else f"the control character {bad!r}"
        raise HierError(f"{what} {name!r} holds {why}; names must be printable text")
    return name


def registry_file(path: str | Path) -> Path:
    """``path`` itself, or, for a bare name that is no file here (``hecto2025``; a folder of that name,
    such as the competition's data, does not count), the CSV of that name shipped in ``hier/registry``."""
    path = Path(path)
    shipped = REGISTRY / f"{path.name}.csv"
    if not path.is_file() and path.parent == Path(".") and not path.suffix and shipped.is_file():
        return shipped
    return path


def read_registry(path: str | Path, **kw) -> pd.DataFrame:
    """A registry/taxonomy CSV as strings, exactly as written: no cell is read as missing (a class,
    brand or model may be called ``NA``, ``None`` or ``null``), a BOM is dropped."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8-sig", **kw)


def parse_hecto_name(name: str) -> dict:
    """``K5_3세대_하이브리드_2020_2022`` -> model K5, generation '3세대 하이브리드', years 2020-2022.

    The make is not in a Hecto name, so brand is left empty: a registry CSV must supply it.
    """
    name = nfc(name)
    tokens = name.split("_")
    years = []
    while len(tokens) > 1 and _YEAR.match(tokens[-1]) and len(years) < 2:
        years.insert(0, int(tokens.pop()))
    if not years:
        raise HierError(f"cannot read a year range from class name {name!r}")
    return {"class": name, "brand": "", "model": tokens[0], "year_start": years[0], "year_end": years[-1],
            "generation": " ".join(tokens[1:])}


_MULTIWORD_MAKES = ("AM General", "Aston Martin", "Land Rover", "Rolls-Royce", "Mercedes-Benz", "Ram C/V")


def parse_stanford_name(name: str) -> dict:
    """``Aston Martin V8 Vantage Convertible 2012`` -> brand Aston Martin, model without the year."""
    name = nfc(name)
    head, _, year = name.rpartition(" ")
    if not _YEAR.match(year) or not head:
        raise HierError(f"cannot read '<Make> <Model> <Year>' from class name {name!r}")
    brand = next((m for m in _MULTIWORD_MAKES if head.startswith(m + " ")), head.split(" ")[0])
    return {"class": name, "brand": brand, "model": head, "year_start": int(year), "year_end": int(year),
            "generation": ""}


def parse_class_name(name: str) -> dict:
    """Parse a Hecto-style (underscores) or Stanford-style (spaces) class name."""
    return parse_hecto_name(name) if "_" in name else parse_stanford_name(name)


@dataclass
class Taxonomy:
    """Validated fine -> model -> brand table with integer index maps (classes keep their row order)."""

    table: pd.DataFrame

    def __post_init__(self) -> None:
        self.table = validate(self.table)
        self.classes: list[str] = self.table["class"].tolist()
        self.models: list[str] = list(dict.fromkeys(self.table["model"]))
        self.brands: list[str] = list(dict.fromkeys(self.table["brand"]))
        model_idx = {m: i for i, m in enumerate(self.models)}
        brand_idx = {b: i for i, b in enumerate(self.brands)}
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.fine_to_model = self.table["model"].map(model_idx).to_numpy(np.int64)
        first = self.table.drop_duplicates("model")
        self.model_to_brand = first["brand"].map(brand_idx).to_numpy(np.int64)
        self.fine_to_brand = self.model_to_brand[self.fine_to_model]

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_csv(cls, path: str | Path) -> "Taxonomy":
        """From a CSV file, or by the name of one shipped with hier (``hecto2025``: ``registry_file``)."""
        path = registry_file(path)
        if not path.is_file():
            raise HierError(f"taxonomy file not found: {path}")
        try:
            table = read_registry(path)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            raise HierError(f"cannot read taxonomy {path}: {str(e).strip().splitlines()[-1]}") from None
        return cls(table)

    @classmethod
    def from_class_names(cls, names: list[str]) -> "Taxonomy":
        """Parse names where no CSV exists; Hecto names get brand = model (the make is not in the name)."""
        rows = [parse_class_name(n) for n in names]
        for r in rows:
            r["brand"] = r["brand"] or r["model"]
        return cls(pd.DataFrame(rows))

    def to_csv(self, path: str | Path) -> None:
        """Write UTF-8 CSV and read it back: a name the file would not return exactly (a bare carriage
        return is not quoted by the csv module) is refused here, before an atomic save renames the file
        into an artifact that could then never be read."""
        self.table.to_csv(path, index=False, encoding="utf-8", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        try:
            same = Taxonomy.from_csv(path).table.to_dict("list") == self.table.to_dict("list")
        except HierError:
            same = False
        if not same:
            cells = self.table[[*NAME_COLUMNS, "generation"]].to_numpy().ravel().tolist()
            odd = next((v for v in cells if "\r" in v or "\n" in v), None)
            raise HierError(f"taxonomy.csv cannot store the name {odd!r}: it would not read back the same"
                            if odd else "taxonomy.csv would not read back as written; refused")

    # --- queries ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    def __contains__(self, name: str) -> bool:
        return nfc(name) in self.class_index

    def row(self, name: str) -> dict:
        return self.table.iloc[self.class_index[nfc(name)]].to_dict()

    def subset(self, classes: list[str]) -> "Taxonomy":
        missing = [c for c in classes if c not in self.class_index]
        if missing:
            raise HierError(f"{len(missing)} class(es) not in the taxonomy, e.g. {missing[0]!r}")
        return Taxonomy(self.table.set_index("class").loc[classes].reset_index())

    def extend(self, rows: list[dict]) -> "Taxonomy":
        """A new taxonomy with more fine classes (enrollment); the existing rows keep their indices."""
        return Taxonomy(pd.concat([self.table, pd.DataFrame(rows)], ignore_index=True))

    def drop(self, name: str) -> "Taxonomy":
        return Taxonomy(self.table[self.table["class"] != name].reset_index(drop=True))

    def marginals(self, fine_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model, brand) probabilities as sums of fine-class probabilities, so levels never disagree."""
        return (sum_columns(fine_probs, self.fine_to_model, len(self.models)),
                sum_columns(fine_probs, self.fine_to_brand, len(self.brands)))

    def years(self, name: str) -> str:
        r = self.row(name)
        a, b = int(r["year_start"]), int(r["year_end"])
        return str(a) if a == b else f"{a}-{b}"


def sum_columns(probs: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum the columns of ``probs`` (N, C) that share a group id: (N, n_groups)."""
    onehot = np.zeros((len(groups), n_groups), dtype=probs.dtype)
    onehot[np.arange(len(groups)), groups] = 1
    return probs @ onehot


def validate(table: pd.DataFrame) -> pd.DataFrame:
    """One model per class, one brand per model, no duplicate classes, integer years in order."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise HierError(f"taxonomy lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    table = table.copy()
    if "generation" not in table.columns:
        table["generation"] = ""
    table["generation"] = table["generation"].fillna("").astype(str)
    if table.empty:
        raise HierError("taxonomy has no classes")
    for col in NAME_COLUMNS:
        if table[col].isna().any() or (table[col].astype(str).str.strip() == "").any():
            raise HierError(f"taxonomy has an empty {col!r} value")
        table[col] = table[col].astype(str).map(nfc)
    table["generation"] = table["generation"].map(nfc)
    dup = table["class"][table["class"].duplicated()]
    if len(dup):
        raise HierError(f"taxonomy lists class {dup.iloc[0]!r} twice")
    brands_per_model = table.groupby("model")["brand"].nunique()
    if (brands_per_model > 1).any():
        m = brands_per_model[brands_per_model > 1].index[0]
        raise HierError(f"model {m!r} is under more than one brand: "
                        f"{sorted(table.loc[table['model'] == m, 'brand'].unique())}")
    for col in ("year_start", "year_end"):           # strings from a CSV, numbers from code
        years = pd.to_numeric(table[col], errors="coerce")
        if not np.isfinite(years).all() or (years != years.round()).any():
            raise HierError("taxonomy year_start/year_end must be whole numbers")
        table[col] = years.astype(np.int64)
    bad = table[table["year_start"] > table["year_end"]]
    if len(bad):
        raise HierError(f"class {bad['class'].iloc[0]!r} has year_start after year_end")
    return table[COLUMNS + ["generation"]].reset_index(drop=True)
