"""``hier audit``: what is wrong with a labelled dataset, found before a model learns it.

Label noise costs a fine-grained model more than a few missing photos: one photo filed under two
classes teaches it that they are the same car, copies of one photo inflate a class and leak between
train and validation, and interiors, keys or a different car under a class name drag its mean away.
The audit finds, per class and across classes:

- exact duplicates (MD5 of the file's bytes); a group spanning two or more classes is a label error;
- near-duplicates (the same photo resized, recropped or recompressed): embedding cosine >= ``near``,
  found by a FAISS range search, with an artifact's embeddings or, without one, the offline ImageNet
  ``efficientnet_lite0`` trunk's pooled features. 0.93 by default, measured with that trunk on the
  Stanford dev photos: copies recompressed at JPEG quality 60 or upscaled 1.5x score 0.95-0.99, the
  same press photo filed under two classes 0.93-0.99, while 0.97 (the first guess) missed three of
  those four; a trained artifact's embeddings gather a class tighter, so give it a higher ``near``;
  or perceptual hashes (pHash, ``imagehash``) at most ``PHASH_BITS`` of 64 bits apart: a half-size
  re-encoded copy the embedding placed at 0.83 hashes 0 bits from its original;
- outliers: a low cosine to the mean of the rest of the class, judged by a robust (median/MAD)
  z-score within the class, so a class of varied photos does not flag more than a uniform one;
- unreadable, non-image and too-large files (the readers skip them; here each is listed).

It writes ``OUT/audit.html`` (built like ``hier report``: a temporary folder sealed with a marker and
moved into place, an ``OUT`` that is not an earlier audit refused), ``audit.json``, the PNG figures, a
contact sheet of the outliers, and ``exclude.txt``: the paths (relative to DATA) training should drop,
read back by ``read_exclude`` / ``apply_exclude``."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hier import fileio, outputs
from hier.artifact import store
from hier.audit.find import OUTLIER_Z, PHASH_BITS, counts, embed, exclude_list, find, per_class
from hier.audit.page import write_page
from hier.audit.scan import file_table, rejected_files
from hier.data.exclude import format_exclude
from hier.data.readers import LAYOUTS, create_reader, detect_layout
from hier.errors import HierError, check_number
from hier.export import artifact_predictor
from hier.runtime import device

MARKER = ".hier-audit"
NEAR_KEPT = 10_000          # near pairs listed in audit.json (all are counted)


def audit(data: str | Path, out: str | Path, artifact: str | Path | None = None, layout: str = "auto",
          near: float = 0.93, outliers: int = 48, exclude_outliers: int = 0, exclude_near: bool = False,
          write_exclude: str | Path | None = None, force: bool = False, batch_size: int = 64,
          progress=None) -> dict:
    """Audit the labelled photos at ``data`` into ``out``; returns what ``audit.json`` holds. Every flag,
    ``out`` and ``write_exclude`` are checked before any photo is read."""
    near = check_number("--near", near, 0.5, 1.0)
    outliers = check_number("--outliers", outliers, 0, 10_000, integer=True)
    exclude_outliers = check_number("--exclude-outliers", exclude_outliers, 0, 10**9, integer=True)
    batch_size = check_number("--batch-size", batch_size, 1, 4096, integer=True)
    if layout not in LAYOUTS:
        raise HierError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    data, given = Path(data), out
    if not data.is_dir():
        raise HierError(f"data folder not found: {data}")
    out = outputs.target(out, data, artifact, MARKER)
    if out.is_relative_to(data.resolve()):
        raise HierError(f"--out {given} is inside the data folder {data} (it would be read as a class); "
                        "choose a folder outside it")
    outputs.writable_destination(out, given)
    exclude_file = _exclude_target(write_exclude, out, force) if write_exclude is not None else None
    predictor = None
    if artifact is not None:         # refuses a folder that is not one artifact (an ensemble: a member)
        _, net, _ = store.snapshot(artifact, device())
        predictor = artifact_predictor(artifact, net, batch_size=batch_size)

    images, _ = create_reader(data, layout)()
    rejected = rejected_files(data, images, detect_layout(data) if layout == "auto" else layout)
    files = file_table(data, images, progress)
    z = embed(images.paths, predictor, batch_size, progress)
    result = find(files, z, near)
    ranked = result["ranked_outliers"]
    listed = exclude_list(result["exact"], ranked[:exclude_outliers], result["near"] if exclude_near else [])
    report = {
        "data": str(data), "artifact": str(artifact) if artifact else None,
        "embedding": "artifact" if artifact else "ImageNet efficientnet_lite0 (offline)",
        "near_threshold": near, "phash_bits": PHASH_BITS, "outlier_z": OUTLIER_Z,
        "counts": counts(files, result, rejected, listed),
        "skipped": images.skipped_message(),
        "classes": per_class(files, result),
        "exact_duplicates": result["exact"],
        "near_duplicates": result["near"][:NEAR_KEPT],
        "outliers": ranked[:max(outliers, exclude_outliers)],
        "unreadable": rejected,
        "exclude": {"file": str(write_exclude) if write_exclude is not None else None, "paths": len(listed),
                    "outliers_listed": min(exclude_outliers, len(ranked)), "near_cross_class": exclude_near},
    }
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        write_page(tmp, data, files, images, report, listed, outliers)
        outputs.seal(tmp, MARKER)
        outputs.swap(tmp, out, given, MARKER)
    except OSError as e:
        raise HierError(f"could not write the audit ({e.strerror or e}{f': {e.filename}' if e.filename else ''}); "
                        f"{given} is as it was") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if exclude_file is not None:
        _write_exclude(exclude_file, listed, force, write_exclude)
    return report


# --- the exclude file ---------------------------------------------------------------------------------

def _exclude_target(path: str | Path, out: Path, force: bool) -> Path:
    """``--write-exclude``'s file, checked before any work: never an existing file unless ``force``,
    never inside ``--out`` (replaced by the next audit)."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    if real.is_relative_to(out):
        raise HierError(f"--write-exclude {path} is inside --out (the next audit replaces it); write it elsewhere")
    if real.is_dir():
        raise HierError(f"--write-exclude {path} is a folder; give a file name")
    if real.exists() and not force:
        raise HierError(f"--write-exclude {path} exists; refused to overwrite it (pass --force to replace it)")
    if not real.parent.is_dir():
        raise HierError(f"--write-exclude {path}: folder {path.parent} does not exist")
    if not os.access(real.parent, os.W_OK):
        raise HierError(f"--write-exclude {path}: folder {path.parent} is not writable")
    return real


def _write_exclude(path: Path, listed: list[str], force: bool, given) -> None:
    text = format_exclude(listed)               # every path reads back as written (``parse_exclude``)
    try:
        if force:
            fileio.atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
        else:
            with open(path, "x", encoding="utf-8") as f:      # "x": a file that appeared meanwhile is kept
                f.write(text)
    except FileExistsError:
        raise HierError(f"--write-exclude {given} appeared during the audit; refused to overwrite it "
                        "(pass --force to replace it)") from None
    except OSError as e:
        raise HierError(f"could not write --write-exclude {given} ({e.strerror or e}); the audit itself is written") \
            from None


# --- the page -----------------------------------------------------------------------------------------

