"""One exception type for every user-facing failure.

Why: the CLI turns an `SndError` into one readable line (what went wrong, which file, how to fix it)
and a non-zero exit code, while real bugs keep their tracebacks.
"""
from __future__ import annotations

import errno
from pathlib import Path


class SndError(Exception):
    """A failure caused by input the user can fix (missing file, wrong format, bad option)."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.message
        if self.path is not None and str(self.path) not in text:
            text = f"{text} [{self.path}]"
        if self.hint:
            text = f"{text}\n  fix: {self.hint}"
        return text


def require_file(path: str | Path, what: str, hint: str | None = None) -> Path:
    """Return `path` if it is an existing file, else raise an SndError naming it and `what` it should be."""
    p = Path(path)
    if not p.is_file():
        raise SndError(f"missing {what}: {p}", path=p, hint=hint)
    return p


def require_dir(path: str | Path, what: str, hint: str | None = None) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise SndError(f"missing {what} (folder): {p}", path=p, hint=hint)
    return p


# File-system refusals that the user fixes, not snd: the CLI shows them like an SndError (other OSErrors,
# e.g. a file snd itself should have written first, keep their traceback: they are bugs).
_USER_OS_HINTS = {
    errno.EEXIST: "a file stands where snd needs a folder: choose another path or move the file",
    errno.ENOTDIR: "a file stands where snd needs a folder: choose another path or move the file",
    errno.EISDIR: "a folder stands where snd needs a file: choose another path",
    errno.EACCES: "check the path's permissions, or choose a path you can write",
    errno.EPERM: "check the path's permissions, or choose a path you can write",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "free disk space (`snd cache gc` lists what can go), then rerun the same command: it resumes",
    errno.EDQUOT: "free disk space (`snd cache gc` lists what can go), then rerun the same command: it resumes",
}


def user_os_error(e: OSError) -> SndError | None:
    """`e` as an SndError (naming its file and the fix) when it is a refusal the user fixes: a file where a
    folder should be, no permission, read-only or full disk; None for any other OSError."""
    hint = _USER_OS_HINTS.get(e.errno) if e.errno is not None else None
    if hint is None:
        return None
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return SndError(f"{e.strerror or e}: {where}" if where else str(e.strerror or e),
                    path=e.filename if e.filename is not None else None, hint=hint)
