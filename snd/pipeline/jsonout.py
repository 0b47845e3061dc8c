"""How every `snd bench ...` hands over its result: JSON on stdout, and the same text in `--out` when given."""
from __future__ import annotations

import json
from pathlib import Path


def emit_json(obj: dict, out: "str | Path | None") -> dict:
    """Print `obj` as indented JSON; also write it to `out` (parents created). Returns `obj`."""
    text = json.dumps(obj, indent=2)
    print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return obj
