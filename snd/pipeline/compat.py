"""Workarounds for interpreter bugs that snd's threads can hit.

CPython 3.11 and 3.12 build Python AST objects with a recursion counter kept in the interpreter's shared AST state
(gh-106905). The GIL can change hands while that counter is raised, so two threads calling `ast.parse` at once
can interleave there. One of them then fails with "SystemError: AST constructor recursion depth mismatch".
Libraries call `ast.parse` where nobody expects it:
- numpy's `ast.literal_eval`, on every `.npy`/`.npz` header (`np.load`) and on comma-string dtypes, which trimesh's
  PLY reader builds;
- `inspect.signature` of builtins, on numpy.ma's first import.

Stage one's loader threads do exactly that, reading meshes and render caches. A CI run lost a scene to it
(2026-12-05, `tests/test_distill.py`'s store: one scene's marker said `SystemError: AST constructor recursion depth
mismatch (before=45, after=42)`).

`serialize_ast_parse` puts one lock around `ast.parse` for the process. Its callers are rare and small (a header,
a dtype string), so the lock costs nothing measurable, and they can no longer interleave.
"""
from __future__ import annotations

import ast
import functools
import sys
import threading

__all__ = ["AST_LOCK", "serialize_ast_parse", "needs_ast_lock"]

AST_LOCK = threading.RLock()  # re-entrant: a finalizer run by the GC inside ast.parse may parse again


def needs_ast_lock() -> bool:
    """Whether this interpreter has the shared AST recursion counter (CPython before 3.13)."""
    return sys.implementation.name == "cpython" and sys.version_info < (3, 13)


def serialize_ast_parse() -> bool:
    """Make `ast.parse` (and so `ast.literal_eval`, which calls it by its module-global name) take `AST_LOCK`.

    Idempotent; a no-op where `needs_ast_lock()` is False. Returns whether `ast.parse` is serialized now."""
    if not needs_ast_lock():
        return False
    if getattr(ast.parse, "_snd_serialized", False):
        return True
    parse = ast.parse

    @functools.wraps(parse)
    def locked_parse(*args, **kwargs):
        with AST_LOCK:
            return parse(*args, **kwargs)

    locked_parse._snd_serialized = True  # type: ignore[attr-defined]
    ast.parse = locked_parse
    return True
