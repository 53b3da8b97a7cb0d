"""What a new class is: its taxonomy row (brand, model, generation, years) from the flags and its name."""
from __future__ import annotations

from hier.errors import HierError, check_number
from hier.taxonomy import _YEAR, YEARS, Taxonomy, parse_class_name


def parse_years(years: str | None) -> tuple[int, int] | None:
    """``--years 2025-2026`` (or ``2025``) as (first, last), both model years hier can hold."""
    if years is None:
        return None
    a, _, b = str(years).strip().partition("-")
    try:
        a, b = int(a), int(b or a)
    except ValueError:
        raise HierError(f"--years must look like 2025-2026, not {years!r}") from None
    for y in (a, b):
        check_number("--years", y, *YEARS, integer=True)
    if a > b:
        raise HierError(f"--years {years}: the first year comes after the last")
    return a, b


def _brand_model(name: str, known: dict[str, str], brand: str | None) -> dict | None:
    """Brand and model from a ``<brand>_<model>_..._<years>`` name (the demo's, e.g. ``Aurora_Nova_2024_2025``)
    when its first tokens are a known brand (or ``--brand``): the longest known model of that brand that
    follows, else the next token as a new model of it."""
    parts = name.split("_")
    while len(parts) > 1 and _YEAR.match(parts[-1]):
        parts.pop()
    brands = set(known.values()) | ({brand} if brand else set())
    for i in range(1, len(parts)):
        b = "_".join(parts[:i])
        if b not in brands or (brand and b != brand):
            continue
        rest = parts[i:]
        j = next((j for j in range(len(rest), 0, -1) if known.get("_".join(rest[:j])) == b), 1)
        return {"brand": b, "model": "_".join(rest[:j]), "generation": " ".join(rest[j:])}
    return None


def new_row(name: str, taxonomy: Taxonomy, brand: str | None, model: str | None,
            years: tuple[int, int] | None) -> dict:
    """Taxonomy row for a new class: flags win, then the class name (a Hecto ``<model>_..._<years>`` whose
    model is known, or a ``<brand>_<model>_..._<years>`` whose brand is), then the model's known brand."""
    try:
        row = parse_class_name(name)
    except HierError:
        row = {"class": name, "brand": "", "model": name, "generation": ""}
        if not years:
            raise HierError(f"cannot read years from {name!r}; pass --years 2025-2025") from None
    if years:
        row["year_start"], row["year_end"] = years
    known = dict(zip(taxonomy.table["model"], taxonomy.table["brand"]))
    if not model and row["model"] not in known and "_" in name:
        row.update(_brand_model(name, known, brand) or {})
    if model:
        row["model"] = model
    row["brand"] = brand or known.get(row["model"]) or row["brand"]
    if not row["brand"]:
        raise HierError(f"brand of {name!r} is unknown; pass --brand")
    if row["model"] in known and known[row["model"]] != row["brand"]:
        raise HierError(f"model {row['model']!r} already belongs to brand {known[row['model']]!r}")
    return row
