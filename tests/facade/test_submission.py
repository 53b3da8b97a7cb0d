"""Hecto submissions (`hier predict --test-csv --sample-submission`, ``Recognizer.submission``): the sample
fixes the order of columns and rows and keeps its BOM; a sample that does not fit (an unknown class, other
IDs, a missing column) is refused before a single photo is predicted, by the command and by the Python API
(issue 15, item 12), with no file left behind; a sample read and checked once writes the same file as its path."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, run_cli

from hier import artifact
from hier.errors import HierError
from hier.recognizer import Recognizer
from hier.runtime import Predictor


def test_submission_format(tiny_artifact, demo_data, tmp_path, capsys):
    # The user's sample file fixes the order: shuffle its columns and rows, keep its BOM.
    sample = pd.read_csv(demo_data.sample_submission, encoding="utf-8-sig")
    cols = ["ID"] + list(np.random.default_rng(0).permutation(sample.columns[1:]))
    shuffled = tmp_path / "sample.csv"
    sample[cols].iloc[::-1].to_csv(shuffled, index=False, encoding="utf-8-sig")
    sub = tmp_path / "sub.csv"
    code, _, err = run_cli("predict", tiny_artifact[0], "--test-csv", demo_data.test_csv,
                           "--sample-submission", shuffled, "--out", sub, "--tta", capsys=capsys)
    assert code == 0, err
    assert sub.read_bytes()[:3] == b"\xef\xbb\xbf"
    got = pd.read_csv(sub, encoding="utf-8-sig")
    assert got.columns.tolist() == cols
    assert got["ID"].tolist() == sample["ID"].iloc[::-1].tolist()
    p = got.iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-9)
    assert p.min() > 0


def test_predict_rejects_mismatched_sample(tiny_artifact, demo_data, tmp_path, capsys):
    sample = pd.read_csv(demo_data.sample_submission, encoding="utf-8-sig")
    bad = tmp_path / "bad.csv"
    sample.rename(columns={sample.columns[3]: "Unknown_Car_2030_2031"}).to_csv(bad, index=False)
    sub = tmp_path / "sub.csv"
    code, _, err = run_cli("predict", tiny_artifact[0], "--test-csv", demo_data.test_csv,
                           "--sample-submission", bad, "--out", sub, capsys=capsys)
    assert code == 2 and "Unknown_Car_2030_2031" in err and not sub.exists()
    assert list(tmp_path.iterdir()) == [bad]          # no temp file left behind either


# --- checks before work (issue 15, item 12) -------------------------------------------------------------

@pytest.fixture
def predicted(monkeypatch):
    """Counts photos the predictor is asked for, whichever command asks."""
    seen = []
    real = Predictor.__call__

    def counting(self, images, progress=None):
        seen.append(len(images))
        return real(self, images, progress)
    monkeypatch.setattr(Predictor, "__call__", counting)
    return seen


@pytest.mark.parametrize("case", ["ids", "column", "missing class"])
def test_a_sample_submission_that_does_not_fit_is_refused_before_predicting(case, tiny_artifact, demo_data,
                                                                             tmp_path, predicted, capsys):
    sample = pd.read_csv(demo_data.sample_submission, encoding="utf-8-sig", dtype={"ID": str})
    if case == "ids":
        sample.loc[0, "ID"] = "TEST_99999"
    elif case == "column":
        sample = sample.rename(columns={sample.columns[3]: "Nope_Car_2020_2020"})
    else:
        sample = sample.drop(columns=sample.columns[-1])
    bad = tmp_path / "sample.csv"
    sample.to_csv(bad, index=False, encoding="utf-8-sig")
    code, _, err = run_cli("predict", tiny_artifact[0], "--test-csv", demo_data.test_csv, "--sample-submission",
                           bad, "--out", tmp_path / "sub.csv", capsys=capsys)
    message = {"ids": "'TEST_99999' is only in the sample", "column": "'Nope_Car_2020_2020' is not a class",
               "missing class": "has no column"}[case]
    assert one_error_line(code, err) and message in err, err
    assert predicted == [] and not (tmp_path / "sub.csv").exists()
    with pytest.raises(HierError, match=message.replace("'", ".")):          # the Python API checks first too
        Recognizer(tiny_artifact[0]).submission(demo_data.test_csv, bad, tmp_path / "sub.csv")
    assert predicted == [] and not (tmp_path / "sub.csv").exists()


def test_read_sample_then_write_matches_writing_from_the_path(tiny_artifact, demo_data, tmp_path):
    from hier.competitions.hecto import read_sample, write_submission
    from hier.data import read_test_csv
    tax = artifact.load(tiny_artifact[0])[1]
    ids = read_test_csv(demo_data.test_csv).ids
    probs = np.random.default_rng(0).dirichlet(np.ones(len(tax)), len(ids))
    checked = read_sample(demo_data.sample_submission, ids, tax)
    a = write_submission(probs, ids, tax, checked, tmp_path / "a.csv")
    b = write_submission(probs, ids, tax, demo_data.sample_submission, tmp_path / "b.csv")
    assert a.equals(b) and (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes()[:3] == b"\xef\xbb\xbf"          # the sample's BOM kept
    with pytest.raises(HierError, match="IDs do not match"):
        read_sample(demo_data.sample_submission, ids[1:], tax)
