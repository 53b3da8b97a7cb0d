"""Folders of outputs a command writes for a person (``hier report``, ``hier audit``): written complete
beside the target, sealed with a marker listing their files, and swapped in, so the target is only ever
an absent or empty folder, or an earlier output of the same kind, and one whole version is always on disk.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path

from hier import fileio
from hier.errors import HierError
from hier.version import __version__



def target(out: str | Path, data: str | Path, artifact_dir: str | Path | None, marker: str) -> Path:
    """``out`` with its symbolic links resolved, when a report may replace it; else HierError (one line).
    ``marker``: the kind of earlier folder that may be replaced (``hier audit`` has its own)."""
    real = Path(os.path.realpath(out))
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):
        home = None
    if Path.cwd().resolve().is_relative_to(real):
        raise HierError(f"--out {out} is the current folder or holds it; give the report a folder of its own")
    if home is not None and home.is_relative_to(real):
        raise HierError(f"--out {out} is the home folder or holds it; give the report a folder of its own")
    for what, folder in (("artifact", artifact_dir), ("data", data)):
        if folder is not None and Path(folder).resolve().is_relative_to(real):
            raise HierError(f"--out {out} is or holds the {what} folder {folder}; give the report a folder of its own")
    if real.exists() and not real.is_dir():
        raise HierError(f"--out {out} is a file, not a folder; choose another --out")
    if real.is_dir():
        check_replaceable(real, out, marker)
    return real


def entries(folder: Path) -> set[str]:
    """Every file and folder under ``folder`` (symbolic links as themselves, never followed)."""
    def refuse(e: OSError):
        raise HierError(f"cannot read {e.filename} ({e.strerror}); choose another --out")
    found = set()
    for top, dirs, files in os.walk(folder, onerror=refuse):
        rel = Path(top).relative_to(folder)
        found.update((rel / name).as_posix() for name in dirs + files)
    return found


def check_replaceable(folder: Path, given, marker: str) -> None:
    """Pass for an empty folder, or one holding exactly the files its hier report marker lists."""
    found = entries(folder)
    if not found:
        return
    kind = "hier " + marker.removeprefix(".hier-")
    try:
        listed = json.loads((folder / marker).read_text(encoding="utf-8"))["files"]
        assert isinstance(listed, list) and all(isinstance(f, str) for f in listed)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise HierError(f"{given} exists and is not an earlier {kind} (no {marker} marker in it); "
                        "choose another --out") from None
    allowed = {marker, *listed, *(p.as_posix() for f in listed for p in Path(f).parents if p != Path("."))}
    extra = sorted(found - allowed)
    if extra:
        raise HierError(f"{given} is an earlier {kind} but also holds {extra[0]!r}"
                        f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which hier did not write; "
                        "move it out or choose another --out")


def seal(folder: Path, marker: str) -> None:
    """Write the marker listing the report's files, and give files and folders the modes the umask gives
    a plain open/mkdir (mkdtemp makes the folder 0700, which a web server's account could not read)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / marker).write_text(json.dumps({"hier": __version__, "files": files}, indent=1, ensure_ascii=False),
                                 encoding="utf-8")
    os.chmod(folder, 0o777 & ~fileio.UMASK)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~fileio.UMASK)


def swap(new: Path, out: Path, given, marker: str) -> None:
    """Move the finished report ``new`` to ``out``: an absent or empty ``out`` is replaced in one rename;
    an earlier report is checked again, renamed aside, the new one renamed in, then the old deleted, so
    one of the two is always on disk."""
    try:
        os.replace(new, out)             # out absent, or an empty folder
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    check_replaceable(out, given, marker)       # again: minutes may have passed since the first check
    aside = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
