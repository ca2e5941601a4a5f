"""Files written for a user appear whole or not at all.

Each is written to a temporary name in the same folder and renamed over the target when complete
(`os.replace` is atomic on one file system), so a reader, or a run killed half-way, sees the old file or
the new one, never a part.  Temporaries carry the writer's process id, so a later run can tell those of
killed runs (`remove_stale`) from those of a run still writing.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX file locks: steer runs on Linux and macOS
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY = ".partial-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path`; renamed to `path` when the block ends, removed if it fails.
    The block may make it a directory: a whole directory then replaces the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, suffix=f"-{path.name}")  # what killed writers of this file left
    temporary = path.with_name(f"{TEMPORARY}{os.getpid()}-{path.name}")
    try:
        yield temporary
        if temporary.is_dir() and path.is_dir():  # the old directory moves aside, then goes
            old = path.with_name(f"{TEMPORARY}{os.getpid()}-old-{path.name}")
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except Exception as e:
        failure = os_error_of(e)
        if failure is not None and (failure.filename is None or str(failure.filename).startswith(str(temporary))):
            raise OSError(failure.errno, failure.strerror, str(path)) from e  # named as the user knows it
        raise
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def os_error_of(e: Exception) -> OSError | None:
    """The operating-system error behind `e`: itself, or one that a writer in Rust (safetensors)
    reports as its own error type with "(os error N)" in the message."""
    if isinstance(e, OSError):
        return e
    found = re.search(r"os error (\d+)", str(e))
    if found is None:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` through `atomic_path` (text modes default to UTF-8)."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as temporary, open(temporary, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so even a power cut leaves a whole file


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block: one process at a
    time, the others wait.  The system releases it when its process ends, even one killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: str | os.PathLike, prefix: str = TEMPORARY, suffix: str = "") -> list[Path]:
    """Remove temporaries named `<prefix><pid>-...<suffix>` in `directory` whose writing process is gone."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not (entry.name.startswith(prefix) and entry.name.endswith(suffix)):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def save_figure(figure: Any, path: str | os.PathLike, **options: Any) -> None:
    """`figure.savefig(path)` through `atomic_path` (the format comes from the target's suffix)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".") or None, **options)


def cache_dir() -> Path:
    """Where steer keeps converted models and tokenizer tables (`$STEER_CACHE`, else ~/.cache/steer)."""
    root = os.environ.get("STEER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "steer"
    return Path(root)
