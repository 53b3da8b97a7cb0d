"""Users' CSVs (issue 15, item 10): a test CSV, listings CSV or sample submission that is not UTF-8, empty,
only a header, has an unclosed quote, is UTF-16 without a BOM or names a column twice is refused in one line
with nothing written; UTF-16 CSVs are read with their cells as written (``NA`` stays text), the submission in
the sample's encoding; ``read_table`` keeps strings and names repeated IDs."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, plain_photo, run_cli

from hier.data import read_table, read_test_csv
from hier.errors import HierError


def _files(root):
    """Every file below root with its bytes: refusals leave them as they were."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


BAD_CSVS = {
    "latin1": ("ID,img_path\nTEST_é,a.jpg\n".encode("latin-1"), "is not UTF-8: byte 0xe9 at offset"),
    # Excel on Korean Windows saves CP949: named as such (the message suggested Latin-1)
    "cp949": ("ID,img_path\nTEST_그랜저,a.jpg\n".encode("cp949"), "it may be CP949 (EUC-KR)"),
    "empty": (b"", "is empty (0 bytes)"),
    "header only": (b"ID,img_path\n", "has a header but no rows"),
    "open quote": (b'ID,img_path\nA,"a.jpg\nB,b.jpg\n', "the quote opened on line 2 is never closed"),
    "utf-16 without BOM": ("ID,img_path\nA,a.jpg\n".encode("utf-16-le"), "NUL"),
    "repeated column": (b"ID,ID,img_path\nA,B,a.jpg\n", "names column 'ID' twice"),
}


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_a_bad_test_csv_is_one_line(case, tiny_artifact, demo_data, tmp_path, capsys):
    data, message = BAD_CSVS[case]
    csv = tmp_path / "test.csv"
    csv.write_bytes(data)
    before = _files(tmp_path)
    code, _, err = run_cli("predict", tiny_artifact[0], "--test-csv", csv, "--sample-submission",
                           demo_data.sample_submission, "--out", tmp_path / "sub.csv", capsys=capsys)
    assert one_error_line(code, err) and message in err and "test.csv" in err, err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("case", ["latin1", "empty", "header only", "open quote"])
def test_a_bad_listings_csv_or_sample_submission_is_one_line(case, art, demo_data, tmp_path, capsys):
    data, message = BAD_CSVS[case]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(data.replace(b"ID,img_path", b"listing_id,image"))
    code, _, err = run_cli("index", "build", art, bad, capsys=capsys)
    assert one_error_line(code, err) and message in err and "listings CSV" in err, err
    assert not (art / "gallery").exists()
    bad.write_bytes(data)
    code, _, err = run_cli("predict", art, "--test-csv", demo_data.test_csv, "--sample-submission", bad,
                           "--out", tmp_path / "sub.csv", capsys=capsys)
    assert one_error_line(code, err) and message in err and "sample submission" in err, err
    assert not (tmp_path / "sub.csv").exists()


def test_utf16_csvs_are_read_and_cells_stay_as_written(tiny_artifact, demo_data, tmp_path, capsys):
    """A UTF-16 test CSV and sample (Excel's "Unicode text") are read; IDs 'NA' / 'None' / 'é' stay
    text (pandas read 'NA' as missing: 'empty ID cell'); the answer is written in the sample's encoding."""
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[:3]
    ids = ["NA", "None", "TEST_é"]
    csv = tmp_path / "test.csv"
    csv.write_bytes(pd.DataFrame({"ID": ids, "img_path": photos}).to_csv(index=False).encode("utf-16"))
    assert read_test_csv(csv).ids == ids
    classes = pd.read_csv(demo_data.sample_submission, encoding="utf-8-sig", nrows=0).columns[1:]
    sample = tmp_path / "sample.csv"
    sample.write_bytes(pd.DataFrame(0.0, index=ids[::-1], columns=classes).rename_axis("ID").reset_index()
                       .to_csv(index=False).encode("utf-16"))
    code, out, err = run_cli("predict", tiny_artifact[0], "--test-csv", csv, "--sample-submission", sample,
                             "--out", tmp_path / "sub.csv", capsys=capsys)
    assert code == 0, err
    raw = (tmp_path / "sub.csv").read_bytes()
    assert raw[:2] == b"\xff\xfe"
    sub = pd.read_csv(io.StringIO(raw.decode("utf-16")), dtype={"ID": str}, keep_default_na=False)
    assert sub["ID"].tolist() == ids[::-1] and np.allclose(sub.iloc[:, 1:].sum(1), 1)


def test_read_table_keeps_strings_and_names_repeats(tmp_path):
    f = tmp_path / "t.csv"
    f.write_bytes("\ufeffID,n\nnull,01\nN/A,2\n".encode("utf-8"))
    t = read_table(f, "table", ["ID"])
    assert t["ID"].tolist() == ["null", "N/A"] and t["n"].tolist() == ["01", "2"]
    assert t.attrs["encoding"] == "utf-8-sig"
    f.write_text("ID,img_path\nA,a.jpg\nB,b.jpg\nA,c.jpg\n", encoding="utf-8")
    for p in "abc":
        plain_photo(tmp_path / f"{p}.jpg")
    with pytest.raises(HierError, match=r"lists ID 'A' twice \(rows 2 and 4\)"):
        read_test_csv(f)
