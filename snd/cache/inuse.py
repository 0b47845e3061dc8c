"""'In use' locks: a running writer or reader holds a cache shared; `snd cache gc` and `verify --fix` need it alone.

Why a second lock beside `manifest.store_lock`: that one is held for milliseconds (header creation,
manifest merges), so it cannot tell whether a precompute is half-way through a scene. Every
`snd precompute` (all its ranks) and every `snd eval` using a feature cache holds a *shared* `flock` on
the cache's in-use file for its whole run; the cleaners take it *exclusively without waiting* and refuse
when they cannot, so a temp folder being written is never taken for a killed run's leftover. flock locks
belong to an open file, so this also works between threads of one process (the tests rely on it), and the
kernel drops them when a process dies (a `kill -9` leaves no stale lock). Not for NFS.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import IO, Iterator

from snd.errors import SndError

__all__ = ["IN_USE_FILE", "hold_in_use", "exclusive"]

log = logging.getLogger(__name__)

IN_USE_FILE = "in_use.lock"


def hold_in_use(folder: Path) -> IO:
    """Take the shared in-use lock of `folder` (created if needed); it lasts until the returned file is closed
    (`with hold_in_use(folder): ...` works). Waits while a cleaner holds it (gc: seconds; verify --fix: its pass)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    f = open(Path(folder) / IN_USE_FILE, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for `snd cache gc/verify --fix` to release %s", folder)
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    except BaseException:  # e.g. Ctrl-C while waiting: do not leave the file open
        f.close()
        raise
    return f


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s in-use lock alone for the block, or raise an `SndError` if a running process holds it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / IN_USE_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SndError(f"{what} is in use by a running process (snd precompute / snd eval); nothing was changed",
                           path=folder, hint="wait until it finishes (or stop it), then run this again") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
