"""The taxonomy (class -> model -> brand): parsing class names, its index maps and checks, the Hecto
registry, marginals, and taxonomy.csv round trips of any name it can store."""
import numpy as np
import pandas as pd
import pytest
from conftest import SHARED
from hypothesis import given, settings
from hypothesis import strategies as st

from hier.data.split import load_equivalent_pairs
from hier.errors import HierError
from hier.taxonomy import REGISTRY, Taxonomy, check_name, parse_class_name


def test_parse_hecto_name():
    r = parse_class_name("K5_3세대_하이브리드_2020_2022")
    assert (r["model"], r["generation"], r["year_start"], r["year_end"]) == ("K5", "3세대 하이브리드", 2020, 2022)
    r = parse_class_name("2008_2015_2017")          # Peugeot 2008: the model looks like a year
    assert (r["model"], r["year_start"], r["year_end"]) == ("2008", 2015, 2017)
    assert parse_class_name("G80_RG3_2025")["year_start"] == 2025


def test_parse_stanford_name():
    r = parse_class_name("Aston Martin V8 Vantage Convertible 2012")
    assert (r["brand"], r["model"], r["year_start"]) == ("Aston Martin", "Aston Martin V8 Vantage Convertible", 2012)
    assert parse_class_name("AM General Hummer SUV 2000")["brand"] == "AM General"
    assert parse_class_name("Audi TTS Coupe 2012")["brand"] == "Audi"
    with pytest.raises(HierError, match="Year"):
        parse_class_name("Audi TTS Coupe")


def _table(**overrides):
    rows = [["a1", "A", "a", 2010, 2012], ["a2", "A", "a", 2013, 2015], ["b1", "B", "b", 2001, 2001]]
    t = pd.DataFrame(rows, columns=["class", "brand", "model", "year_start", "year_end"]).astype(object)
    for k, v in overrides.items():
        t.loc[v[0], k] = v[1]
    return t


def test_index_maps():
    t = Taxonomy(_table())
    assert t.models == ["a", "b"] and t.brands == ["A", "B"]
    assert t.fine_to_model.tolist() == [0, 0, 1] and t.fine_to_brand.tolist() == [0, 0, 1]
    assert t.years("a1") == "2010-2012" and t.years("b1") == "2001"


@pytest.mark.parametrize("overrides, message", [
    ({"brand": (1, "B")}, "more than one brand"),
    ({"class": (1, "a1")}, "twice"),
    ({"year_start": (0, 2020)}, "after"),
    ({"year_end": (0, "soon")}, "whole numbers"),
    ({"model": (0, "")}, "empty"),
])
def test_validation_errors(overrides, message):
    with pytest.raises(HierError, match=message):
        Taxonomy(_table(**overrides))


def test_missing_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("class,brand,year_start,year_end\na,A,1,2\n")
    with pytest.raises(HierError, match="lacks column"):
        Taxonomy.from_csv(p)


def test_hecto_registry():
    t = Taxonomy.from_csv(REGISTRY / "hecto2025.csv")
    assert len(t) == 396
    brand = {c: t.row(c)["brand"] for c in t.classes}
    assert brand["1시리즈_F20_2013_2015"] == "BMW"
    assert next(b for c, b in brand.items() if c.startswith("QX60")) == "Infiniti"
    assert {b for c, b in brand.items() if "쏘렌토" in c} == {"Kia"}
    assert t.row("5시리즈_G60_2024_2025")["brand"] == "BMW"
    names = SHARED / "data" / "hecto2025" / "class_names.txt"
    if names.is_file():
        assert t.classes == names.read_text(encoding="utf-8").split()
    pairs = load_equivalent_pairs(REGISTRY / "hecto2025_equivalent.csv")
    assert len(pairs) == 5
    for a, b in pairs:                      # equivalent classes share their parents
        assert t.row(a)["model"] == t.row(b)["model"] and t.row(a)["brand"] == t.row(b)["brand"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=12),
       st.integers(0, 2**32 - 1))
def test_marginals_are_sums_of_fine_probabilities(parents, seed):
    """Property: model/brand probabilities are exactly the sums of their fine classes' probabilities."""
    rows = [[f"c{i}", f"B{b}", f"M{b}_{m}", 2000, 2001] for i, (m, b) in enumerate(parents)]
    t = Taxonomy(pd.DataFrame(rows, columns=["class", "brand", "model", "year_start", "year_end"]))
    p = np.random.default_rng(seed).dirichlet(np.ones(len(t)), size=7)
    model_p, brand_p = t.marginals(p)
    for j, m in enumerate(t.models):
        np.testing.assert_allclose(model_p[:, j], p[:, t.fine_to_model == j].sum(1), atol=1e-12)
    for j, b in enumerate(t.brands):
        np.testing.assert_allclose(brand_p[:, j], p[:, t.fine_to_brand == j].sum(1), atol=1e-12)
        np.testing.assert_allclose(brand_p[:, j], model_p[:, t.model_to_brand == j].sum(1), atol=1e-12)
    np.testing.assert_allclose(brand_p.sum(1), 1, atol=1e-12)


# --- names that pandas reads as missing, names that cannot be stored (issue 15, item 2) -----------------

def test_the_registry_loads_exactly_as_before():
    old = pd.read_csv(REGISTRY / "hecto2025.csv", dtype={"class": str, "brand": str, "model": str},
                      encoding="utf-8-sig")              # the reader before the fix
    assert Taxonomy.from_csv(REGISTRY / "hecto2025.csv").table.to_dict("list") == Taxonomy(old).table.to_dict("list")


NAMES = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12).filter(
    lambda s: s.strip() == s and s.strip())


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NAMES, NAMES, NAMES), min_size=1, max_size=4, unique_by=lambda r: r[0]))
def test_every_storable_name_survives_the_round_trip(tmp_path_factory, rows):
    """Property: any name ``check_name`` accepts reads back from taxonomy.csv exactly (one brand per model)."""
    brand_of = {}
    rows = [(c, brand_of.setdefault(m, b), m) for c, b, m in rows]
    tax = Taxonomy(pd.DataFrame([[c, b, m, 2020, 2021] for c, b, m in rows],
                                columns=["class", "brand", "model", "year_start", "year_end"]))
    for c, b, m in rows:
        for n in (c, b, m):
            check_name("name", n)
    path = tmp_path_factory.mktemp("rt") / "taxonomy.csv"
    tax.to_csv(path)
    assert Taxonomy.from_csv(path).table.to_dict("list") == tax.table.to_dict("list")


def test_the_shipped_registries_are_named_by_their_file_name(tmp_path, monkeypatch):
    """``--taxonomy hecto2025`` from any folder (package data, not a path into the repository); a file
    of that name in the working folder, or any path, is read as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hecto2025_equivalent").mkdir()            # the competition's data folder beside: not a CSV
    assert len(Taxonomy.from_csv("hecto2025")) == 396
    assert len(load_equivalent_pairs("hecto2025_equivalent")) == 5
    (tmp_path / "hecto2025").write_text("class,brand,model,year_start,year_end\nA_B_2020_2021,A,B,2020,2021\n")
    assert Taxonomy.from_csv("hecto2025").classes == ["A_B_2020_2021"]
    with pytest.raises(HierError, match="not found"):
        Taxonomy.from_csv("hecto2024")
