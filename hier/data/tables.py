"""The one checked CSV reader for users' tables (test CSV, listings, sample submission).

A user's CSV is refused with one line naming the file when it cannot be read as meant: an encoding
other than UTF-8 (with or without BOM) or UTF-16 with a BOM (the byte offset of the first bad byte is
given, so the cell can be found), 0 bytes, a header without rows, broken quoting or repeated column
names. Every cell comes back as written: only an empty cell is missing ("NA", "null", "None" stay
text), since sellers' and classes' names are data, not pandas' missing-value spellings.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pandas as pd

from hier.errors import HierError

UTF8_BOM, UTF16_BOMS = b"\xef\xbb\xbf", (b"\xff\xfe", b"\xfe\xff")


def decode_text(data: bytes, where: str) -> tuple[str, str]:
    """``(text, encoding)`` of a user's text file: UTF-8 (``utf-8`` or ``utf-8-sig`` with a BOM) or
    UTF-16 with a BOM (``utf-16``); anything else is one HierError naming the first bad byte."""
    if data.startswith(UTF8_BOM):
        encoding, body, skip = "utf-8-sig", data[len(UTF8_BOM):], len(UTF8_BOM)
    elif data.startswith(UTF16_BOMS):
        encoding, body, skip = "utf-16", data, 0
    else:
        encoding, body, skip = "utf-8", data, 0
    try:
        text = body.decode("utf-16" if encoding == "utf-16" else "utf-8")
    except UnicodeDecodeError as e:
        kind = "UTF-16" if encoding == "utf-16" else "UTF-8"
        try:
            body.decode("cp949")
            guess = "CP949 (EUC-KR), as Excel saves a CSV on Korean Windows"
        except UnicodeDecodeError:
            guess = "in a legacy encoding"
        raise HierError(f"{where} is not {kind}: byte 0x{body[e.start]:02x} at offset {e.start + skip} does not "
                        f"decode (it may be {guess}); save it as UTF-8 (Excel: 'CSV UTF-8')") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise HierError(f"{where} holds a NUL character (character {nul}): UTF-16 without a byte-order mark, "
                        "or not a text file; save it as UTF-8")
    return text, encoding


def read_table(path: str | Path, what: str, required: list[str] | tuple[str, ...] = (),
               dtype: type | dict | None = str, usecols: list[int] | None = None) -> pd.DataFrame:
    """A user's CSV as a DataFrame, checked (see the module docstring). ``what`` names it in messages
    ("test CSV"); ``required`` columns must be present; ``dtype``: pandas' (``str`` keeps every cell a
    string; a dict types some columns and lets pandas infer the rest); ``usecols``: positions of the
    columns to keep (the whole file is still parsed and checked). ``table.attrs``: ``encoding`` (the
    file's, for writing an answer the way the file was written) and ``header`` (every column name)."""
    path = Path(path)
    if not path.is_file():
        raise HierError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HierError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    where = f"{what} {path}"
    if not data:
        raise HierError(f"{where} is empty (0 bytes)")
    text, encoding = decode_text(data, where)
    try:
        header = next(csv.reader(_lines(text)), [])
    except csv.Error as e:
        raise HierError(f"{where} is not a well-formed CSV: {e}") from None
    if not any(h.strip() for h in header):
        raise HierError(f"{where} has no header line (the first line is blank)")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise HierError(f"{where} names column {repeated[0]!r} twice; column names must be unique")
    try:
        # from the bytes (checked above): pandas parses a StringIO several times slower
        table = pd.read_csv(io.BytesIO(data), encoding=encoding, dtype=dtype, keep_default_na=False,
                            na_values=[""], usecols=usecols)
    except pd.errors.EmptyDataError:
        raise HierError(f"{where} has no header line") from None
    except (pd.errors.ParserError, csv.Error, ValueError) as e:
        raise HierError(f"{where} is not a well-formed CSV: {_parse_error(e)}") from None
    if table.empty:
        raise HierError(f"{where} has a header but no rows")
    missing = [c for c in required if c not in header]
    if missing:
        raise HierError(f"{where} must have columns {','.join(required)} (found {','.join(header)})")
    table.attrs.update(encoding=encoding, header=header)
    return table


def _lines(text: str):
    """The text's lines (ended by \\n, \\r\\n or a lone \\r), one at a time: a header needs the first
    one or two, not a copy of the whole file."""
    start = 0
    while start < len(text):
        n, r = text.find("\n", start), text.find("\r", start)
        end = r + 1 if r >= 0 and (n < 0 or r < n - 1) else n + 1 if n >= 0 else len(text)
        yield text[start:end]
        start = end


def _parse_error(e: Exception) -> str:
    """pandas' parse error in the file's own line numbers (pandas counts lines from 0)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    quote = re.search(r"EOF inside string starting at row (\d+)", text)
    if quote:
        return f"the quote opened on line {int(quote.group(1)) + 1} is never closed"
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if fields:
        return (f"line {fields.group(2)} has {fields.group(3)} cells, the header {fields.group(1)} "
                "(a comma in an unquoted cell?)")
    return text.removeprefix("Error tokenizing data. C error: ")[:200]


def first_repeat(column: pd.Series) -> tuple[str, int, int] | None:
    """The first value that repeats in a column and the positions (0-based) of its first two
    occurrences, or None: a CSV's rows are those + 2 (the header is row 1)."""
    repeats = column[column.duplicated()]
    if repeats.empty:
        return None
    where = (column == repeats.iloc[0]).to_numpy().nonzero()[0]
    return repeats.iloc[0], int(where[0]), int(where[1])
