"""Outputs a command writes where a user names them (``--out``), checked before any work so they never
replace an input, land inside an artifact, or fail on an unwritable folder after the work is done.

``output_file`` guards one file (``hier predict --out``); ``target`` an output folder (``hier report``,
``hier audit``), which is written complete beside the target, sealed with a marker listing its files, and
swapped in, so the target is only ever an absent or empty folder, or an earlier output of the same kind,
and one whole version is always on disk.
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


def output_file(out: str | Path, inputs=(), inside: dict[str, str | Path | None] | None = None,
                flag: str = "--out") -> Path:
    """``out`` (resolved) when a command may write it; else HierError, one line, before any work.

    Args:
        out: the file the user named.
        inputs: files the command reads (a test CSV, a sample submission, photos): ``out`` may be none of
            them, whatever path spells it (links, ``..``).
        inside: {what: folder} that ``out`` may not be inside (``{"artifact": ART}``: a file there could
            replace one of the artifact's own).
        flag: the option's name, for the message.

    Raises:
        HierError: ``out`` is a folder, an input, inside a refused folder, or in a folder that is missing
            or not writable (a read-only volume).
    """
    real = Path(os.path.realpath(out))
    if real.is_dir():
        raise HierError(f"{flag} {out} is a folder; give a file name")
    # an input exists, so only an existing out can be one: a new file costs no path resolution per photo
    same = next((given for given in inputs if given is not None and Path(os.path.realpath(given)) == real),
                None) if real.exists() else None
    if same is not None:
        raise HierError(f"{flag} {out} is {same}, which this command reads; write to another file")
    for what, folder in (inside or {}).items():
        if folder is not None and is_inside(real, folder):
            raise HierError(f"{flag} {out} is inside the {what} {folder}; write it elsewhere")
    writable_folder(real.parent, out, flag)
    return real


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or below it, whatever links or ``..`` spell either."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(folder)))


def writable_destination(out: Path, given, flag: str = "--out") -> None:
    """Refuse, before any work, an ``out`` (absent, or a folder to replace) whose nearest existing folder
    is a file or not writable, or an ``out`` that is a link to nothing: its output is built beside it."""
    if out.is_symlink() and not out.exists():
        raise HierError(f"{flag} {given}: a link to nothing ({os.readlink(out)}); choose another {flag}")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HierError(f"{flag} {given}: {parent} is a file, not a folder; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HierError(f"{flag} {given}: folder {parent} is not writable; choose another {flag}")


def make_folder(out: Path, given, flag: str = "--out") -> None:
    """Create ``out`` and its parents (an existing folder is fine), or say in one line why it cannot be:
    a read-only volume, a file on the way, a link to nothing, no permission."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a link to nothing" if out.is_symlink() and not out.exists() else e.strerror or str(e)
        raise HierError(f"{flag} {given}: cannot create the folder ({why}); choose another {flag}") from None


def writable_folder(folder: Path, given, flag: str = "--out") -> None:
    """HierError unless ``folder`` exists and this process may create files in it."""
    if not folder.is_dir():
        raise HierError(f"{flag} {given}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise HierError(f"{flag} {given}: folder {folder} is not writable (read-only volume or permissions)")


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
