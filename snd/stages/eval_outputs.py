"""`snd eval`'s files: atomic JSON, saved prediction samples and the figures drawn from them.

Split from `snd.stages.evaluate` so the stage module holds the flow only.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean(v: Any) -> Any:
    """NaN -> None so results.json is valid JSON."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _save_samples(path: Path, samples: list[dict]) -> None:
    from safetensors.torch import save_file

    t = {}
    for i, s in enumerate(samples):
        for k in ("image", "gt", "pred"):
            if s.get(k) is not None:
                t[f"{k}.{i}"] = s[k].contiguous().float() if k != "gt" or s[k].is_floating_point() else s[k].contiguous()
    if t:
        save_file(t, str(path.with_name(path.name + ".tmp")))
        os.replace(path.with_name(path.name + ".tmp"), path)


def _load_samples(path: Path) -> list[dict]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    n = 1 + max(int(k.split(".")[1]) for k in t)
    return [{k: t.get(f"{k}.{i}") for k in ("image", "gt", "pred")} for i in range(n)]


def _figures(records: list[dict], out: Path) -> list[Path]:
    from snd.eval.correspondence import write_recall_curve_png
    from snd.eval.figures import prediction_grid

    written = []
    keys = sorted({(r["task"], r["dataset"]) for r in records if r.get("status") == "ok"})
    for task, name in keys:
        rs = [r for r in records if r["task"] == task and r["dataset"] == name and r.get("status") == "ok"]
        rs.sort(key=lambda r: r["role"] != "model")
        try:
            if task == "corr":
                curves = {f"{r['role']}: {r['label']}": r["curve"] for r in rs if r.get("curve")}
                if curves:
                    written.append(write_recall_curve_png(curves, out / "figures" / f"corr_{name}.png",
                                                          title=f"correspondence recall ({name})"))
                continue
            samples = {f"{r['role']}: {r['label']}": _load_samples(Path(r["samples"])) for r in rs
                       if r.get("samples") and Path(r["samples"]).is_file()}
            if samples:
                written.append(prediction_grid(task, samples, out / "figures" / f"{task}_{name}.png"))
        except Exception as e:  # a figure must never lose the numbers
            log.warning("figure %s/%s failed: %s", task, name, e)
    return written
