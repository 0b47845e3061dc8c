"""One exception type for every user-facing failure.

Why: the CLI turns an `SndError` into one readable line (what went wrong, which file, how to fix it)
and a non-zero exit code, while real bugs keep their tracebacks.
"""
from __future__ import annotations

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
