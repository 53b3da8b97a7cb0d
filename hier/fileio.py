"""Generic file I/O of every hier writer and reader: the per-folder lock, atomic writes (one file or a
set that lands together), stamps that tell a reader whether a file changed, and UTF-8 JSON.

Every file is written to a temporary name and renamed, so a crash mid-write never leaves a half-written
file; every reader and writer of a folder holds its lock file (``.hier.lock``), so two commands never
interleave a read-modify-write and a reader never sees one version's weights with another's taxonomy.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from hier import journal
from hier.errors import HierError, HierWarning

LOCK = ".hier.lock"
LOCK_TIMEOUT = 600.0     # seconds a command waits for another one writing the same folder
_locks: dict[Path, FileLock] = {}
_unlocked: set[Path] = set()    # read-only folders read unlocked (warned once each)
_held: dict[Path, int] = {}     # folders whose lock this process holds, and how many times (re-entered)


def _read_umask() -> int:
    """The process's umask. It can only be read by setting it, and it is process-global (a file another
    thread created in between would get the mode set for that instant), so it is read once, at import."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


class Busy(HierError):
    """``locked`` waited its timeout and another process still holds the folder."""


@contextmanager
def locked(path: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the artifact's lock: writers for the whole read-modify-write, readers while they read. A
    command that has to wait says so (one ``warning:`` line), then waits up to ``timeout`` seconds.

    One ``FileLock`` per folder and process, so a writer that loads inside its own lock re-enters it;
    other threads and processes wait (flock). A read-only folder cannot hold a lock file, and nobody
    can write there either, so reading it unlocked is safe (said once). The first holder completes a
    commit a killed writer left (``hier.journal``) before anything is read.
    """
    folder = Path(path).resolve()
    if not folder.is_dir():
        yield
        return
    lock = _locks.setdefault(folder, FileLock(folder / LOCK))
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if timeout <= 0:
                raise
            warnings.warn(f"{path} is busy (another hier command is using it): waiting for it, up to "
                          f"{timeout:.0f} s", HierWarning, stacklevel=3)
            lock.acquire(timeout=timeout)
    except Timeout:
        raise Busy(f"{path} is busy: another hier command " + (f"has been writing it for over {timeout:.0f} s"
                   if timeout > 0 else "is writing it") + "; try again when it ends") from None
    except OSError as e:                    # no lock file can be made or opened there: read-only
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        if (folder / journal.JOURNAL).is_file():    # a killed writer's commit, seen where it cannot be completed
            raise HierError(f"{path} holds an unfinished commit ({journal.JOURNAL}) of a command that was killed; run "
                            "any hier command on it where the folder is writable to complete it") from None
        if folder not in _unlocked:
            _unlocked.add(folder)
            warnings.warn(f"{path} is read-only here: read without its lock (nothing can write it meanwhile "
                          "through this mount)", HierWarning, stacklevel=3)
        yield
        return
    try:
        _held[folder] = _held.get(folder, 0) + 1
        if _held[folder] == 1:
            journal.recover(folder)        # a commit a killed writer left: completed before anything is read
        yield
    finally:
        _held[folder] -= 1
        if not _held[folder]:
            del _held[folder]
        lock.release()


def hold_lock(stack: ExitStack, path: str | Path, wait: bool) -> bool:
    """Enter ``path``'s lock on ``stack``: waiting for a writer as commands do, or (``wait=False``) only
    if it is free now. Returns False when it is busy (never when ``wait``)."""
    try:
        stack.enter_context(locked(path, timeout=None if wait else 0))
    except HierError:
        if wait:
            raise
        return False
    return True


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``."""
    atomic_write_all({Path(path): write})


def atomic_create(path: str | Path, write: Callable[[Path], None]) -> bool:
    """``atomic_write`` that never replaces: the finished file is linked in under ``path`` only if no file
    is there (``link`` fails on an existing name, atomically), so of two writers at once exactly one
    lands. Returns False (nothing written) when ``path`` existed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        refused = refused_write(e, path)
        if refused is None:
            raise
        raise refused from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def refused_write(e: OSError, path: Path) -> HierError | None:
    """The one line for a write the disk or volume refused (full, read-only, no permission)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return HierError(f"no space left on device writing {path}: {_unchanged(path)}")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return HierError(f"cannot write {path} ({e.strerror}): {_unchanged(path)}")
    return None


def atomic_write_all(writers: dict[Path, Callable[[Path], None]], remove: list[Path] = ()) -> None:
    """Write every file to a temp name first and rename them only once all writes succeeded, so a
    failure leaves the old files untouched and the new set lands together: under a folder's lock the
    renames and the removals (``remove``: files or folders the new version no longer has) commit in one
    step (``hier.journal``), so a process killed between two renames leaves a set the next reader
    completes, never a mixture.

    Modes are those a plain ``open(path, "w")`` would give: a file that exists keeps its mode (a
    ``chmod g+r`` for a web server's group sticks), a new one gets 0666 minus the umask (``mkstemp``
    alone would make every file 0600, unreadable to any other account). A full disk (or quota) is one
    line saying that nothing was replaced."""
    temps, folder = {}, None
    try:
        for path, write in writers.items():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.close(fd)
                temps[path] = Path(tmp)
                try:
                    mode = stat.S_IMODE(os.stat(path).st_mode)
                except FileNotFoundError:
                    mode = 0o666 & ~UMASK
                write(temps[path])
                os.chmod(tmp, mode)              # after writing: a kept 0444 must not stop the write
            except OSError as e:
                refused = refused_write(e, path)
                if refused is not None:
                    raise refused from None
                raise
        paths = [Path(os.path.realpath(p)) for p in [*temps, *remove]]
        folder = max((f for f in _held if all(p.is_relative_to(f) for p in paths)), key=lambda f: len(f.parts),
                     default=None)         # the journal goes in the (innermost) folder whose lock is held
        try:
            journal.commit([(Path(os.path.realpath(t)), p) for t, p in zip(temps.values(), paths)],
                           paths[len(temps):], folder)
        except OSError as e:               # a full disk for the journal itself: nothing renamed yet, or completed later
            refused = refused_write(e, paths[0])
            if refused is None:
                raise
            raise refused from None
    except BaseException:
        if folder is not None and (folder / journal.JOURNAL).is_file():
            temps = {}                     # the journal names them: the next holder of the lock renames them
        raise
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def file_stamp(*files: Path) -> tuple:
    """(inode, mtime, size) of each file, None for a missing one: every atomic save changes it, so a
    reader can tell cheaply whether what it holds is still what is on disk."""
    out = []
    for f in files:
        try:
            st = Path(f).stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes: what identifies a photo by content (detector cache, enrollment shots)."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _unchanged(path: Path) -> str:
    """What a refused write left as it was: the artifact, when ``path`` is one of its files (or its gallery's):
    a folder hier writes under its lock holds the lock file."""
    inside = any((folder / LOCK).is_file() for folder in (path.parent, path.parent.parent))
    return "the artifact is unchanged" if inside else f"{path} is unchanged"


def read_json(path: str | Path) -> dict:
    """A JSON file of hier's (config.json, train.json, metrics.json), UTF-8 whatever the locale."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HierError(f"{path} is damaged: not UTF-8 JSON ({e})") from None


def write_json(path: str | Path, obj) -> None:
    """The writer of every JSON file of hier's: UTF-8, names kept readable (``ensure_ascii=False``).
    Plain write: wrap it in ``atomic_write`` or pass it to ``atomic_write_all``. A path that is not
    UTF-8 (surrogate-escaped bytes) is stored \\u-escaped, so the file stays valid UTF-8 JSON."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(obj, indent=2).encode("utf-8")
    Path(path).write_bytes(data)


def save_npy(path: Path, array) -> None:
    """np.save through a file object: given a name, np.save would append .npy to a temp file's name."""
    import numpy as np
    with path.open("wb") as f:
        np.save(f, np.asarray(array, dtype=np.float32))
