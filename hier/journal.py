"""A set of file renames (and removals) that commits in one step, as a database commits a transaction.

Each file of a set is first written complete under a temporary name. Before the first rename, the list
of every rename and removal to come is written as ``.hier.commit`` in the folder whose lock the writer
holds (itself written to a temporary name and renamed: it exists whole or not at all). Then the renames
and removals run, and the journal is deleted. A process killed anywhere in between leaves either no
journal (nothing of the new set is in place: the old version is whole) or a journal, which the next
holder of the folder's lock (``fileio.locked``: every reader and writer) completes before it reads
anything: the renames whose temporary file is still there are done, the removals are done again. So a
reader sees the whole old or the whole new version, never a mixture.

``step`` is called before every rename and removal of a commit and before the journal is deleted: the
crash tests replace it to kill a writer at each step in turn (as SQLite's crash tests do).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hier.errors import HierError

JOURNAL = ".hier.commit"


def step() -> None:
    """A step of a commit is about to run (the fault-injection seam of the crash tests)."""


def commit(renames: list[tuple[Path, Path]], removals: list[Path] = (), folder: Path | None = None) -> None:
    """Rename each (temporary, final) pair and remove ``removals`` (files or folders) as one step.

    Args:
        renames: (temporary file, its final name) pairs, in the order to rename them.
        removals: files or folders to delete with the set (a file the new version no longer has).
        folder: the folder whose lock the caller holds, where the journal goes; None (no lock held) or a
            single change: done in order with no journal (one rename is atomic by itself).
    """
    removals = list(removals)
    if folder is None or len(renames) + len(removals) <= 1:
        _apply([(a, b) for a, b in renames], removals)
        return
    folder = Path(folder)
    record = {"renames": [[_relative(a, folder), _relative(b, folder)] for a, b in renames],
              "remove": [_relative(p, folder) for p in removals]}
    fd, tmp = tempfile.mkstemp(prefix=f"{JOURNAL}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / JOURNAL)          # from here on the new version is the one that lands
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _apply(renames, removals)
    step()
    (folder / JOURNAL).unlink()


def recover(folder: Path) -> bool:
    """Complete the commit a killed writer left in ``folder`` (the caller holds its lock). Returns
    whether there was one.

    Raises:
        HierError: the journal does not read (damaged by something other than a crash of hier).
    """
    journal = Path(folder) / JOURNAL
    if not journal.is_file():
        return False
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        if not (isinstance(record["renames"], list) and isinstance(record["remove"], list) and
                all(isinstance(r, list) and len(r) == 2 for r in record["renames"])):
            raise ValueError("not a commit's record")
        renames = [(_inside(folder, a), _inside(folder, b)) for a, b in record["renames"]]
        removals = [_inside(folder, p) for p in record["remove"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise HierError(f"{journal} does not read, or names files outside {folder} (not a commit of hier's); "
                        f"restore {folder} from a copy, or delete the file and rebuild what the command wrote") \
            from None
    try:
        _apply(renames, removals)
    except OSError as e:
        raise HierError(f"{journal} could not be completed ({e.strerror or e}); restore {folder} from a copy, or "
                        "delete the file and rebuild what the command wrote") from None
    journal.unlink()
    return True


def _apply(renames: list[tuple[Path, Path]], removals: list[Path]) -> None:
    for tmp, final in renames:
        step()
        if tmp.exists():                 # else renamed before a crash: the final name holds it already
            os.replace(tmp, final)
    for path in removals:
        step()
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _inside(folder: Path, name: str) -> Path:
    """``folder / name`` when it stays inside ``folder`` (no absolute path, no ``..`` out of it, no
    symbolic link leading out); else ValueError: a journal is never a way to rename or delete elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"not a path inside the folder: {name!r}")
    path = Path(folder) / name
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real == root or not real.is_relative_to(root):
        raise ValueError(f"not a path inside the folder: {name!r}")
    return path


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` (the journal stays valid when the folder is moved or copied)."""
    return Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(folder))).as_posix()
