"""One writer per run directory, and no half-made directory left behind by a run that failed to start.

Rank 0 holds an exclusive ``flock`` on RUN/.lock for the run's whole life; the kernel releases it
when the process ends, however it ends (kill -9 included), so a stale lock never blocks a resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from zoscale.errors import ConfigError

LOCK = ".lock"


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK) if path.is_dir() else []


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds the old text or the new, never a part: a full disk or a kill mid-write leaves
    the old file (or none) and a stray temporary file beside it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict | None:
    """A JSON file a run wrote, or None when it is missing or unreadable (torn, empty, not JSON)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def refuse_links(path: Path, flag: str) -> None:
    """A run directory holds no symbolic link: every file a run writes (its lock, logs, summary,
    checkpoints, a comparison's reports) then stays inside it, whatever was planted there."""
    if path.is_symlink():
        raise ConfigError(f"{flag} {path} is a symbolic link; give the directory itself")
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                link = Path(root, name).relative_to(path)
                raise ConfigError(f"{flag} {path}: {link} is a symbolic link; a run directory holds none (nothing is "
                                  f"written through one)")


def require_writable(path: Path, flag: str) -> None:
    """``path``'s directory exists (made if missing) and takes files: checked before any work, so
    an unwritable output is one line at the start, not a traceback at the end."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create {path.parent} ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {path.parent} is not writable")


@contextlib.contextmanager
def written_whole(path: Path):
    """A directory that appears whole or not at all: written beside ``path`` (a missing or empty
    directory), renamed into place at the end; on any failure (a full disk) nothing is left."""
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        (path / LOCK).unlink(missing_ok=True)  # a failed start's lock file is all an empty --out may hold
        if path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def require_fresh(path: Path, flag: str) -> None:
    """``path`` must be missing or an empty directory (a lock file left by a failed start aside)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a directory")
    if _contents(path):
        raise ConfigError(f"{flag} {path} exists and is not empty; choose another directory (nothing was overwritten)")


class RunDirectory:
    """``with RunDirectory(path, fresh, main):`` the lock is held inside. ``fresh``: the directory must
    not hold a run yet (it is made if missing); ``main``: this process takes the lock (rank 0).
    If the block fails before the run wrote anything, what was made here is removed again."""

    def __init__(self, path: Path, fresh: bool, main: bool = True, flag: str = "--out"):
        self.path, self.fresh, self.main, self.flag = path, fresh, main, flag
        self.created = False
        self.handle = None

    def __enter__(self) -> RunDirectory:
        if not self.main:
            return self
        refuse_links(self.path, self.flag)
        if self.fresh:
            require_fresh(self.path, self.flag)
            self.created = not self.path.exists()
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{self.flag} {self.path}: cannot create it ({e.strerror})") from None
        try:  # never through a link planted after the check
            self.handle = os.fdopen(os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as e:
            raise ConfigError(f"{self.flag} {self.path}: cannot write in it ({e.strerror})") from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            self.handle = None
            raise ConfigError(f"{self.flag} {self.path} is in use by another zoscale run (pid {holder}); wait for it "
                              f"to end or choose another directory") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()
        if self.fresh and _contents(self.path):  # another run got here between the check and the lock
            self._release()
            raise ConfigError(f"{self.flag} {self.path} exists and is not empty; choose another directory")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.handle is None:
            return
        self._release(remove=kind is not None and self.fresh and not _contents(self.path))

    def _release(self, remove: bool = False) -> None:
        if remove:
            (self.path / LOCK).unlink(missing_ok=True)
            if self.created:
                self.path.rmdir()
        self.handle.close()  # closing the file releases the lock
        self.handle = None
