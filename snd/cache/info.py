"""`snd cache info`: what a scaffold store or an evaluation cache folder holds, as a dict (JSON) or tables.

Why from the files alone: a 300 GB store outlives the run that made it; its header, markers, run records
and Zarr metadata say everything (settings, scenes complete or not, pairs, sizes per array, who wrote it),
so nothing here needs the dataset or a model. Header fields are printed generically (whatever the schema
version records), the summaries below them are computed.

Evaluation caches (`snd eval`'s feature cache folder) hold one folder per backbone key (weights hash, input
size, extraction precision) with a row store per (dataset, split), plus model-independent `targets/`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from snd.cache import manifest as M
from snd.cache.writer import folder_bytes
from snd.errors import SndError

__all__ = ["cache_kind", "scaffold_info", "size_split", "eval_info", "cache_info", "print_info", "eval_root", "row_stores"]

Kind = Literal["scaffold", "eval"]
_MB = 1e6


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"unreadable {Path(path).name}: {e}"}


def _is_eval(path: Path) -> bool:
    return path.is_dir() and ((path / "targets").is_dir() or any((d / "model.json").is_file() for d in path.iterdir() if d.is_dir()))


def eval_root(path: Path) -> Path | None:
    """The evaluation cache folder at `path` (or `path/features`, `snd eval --out`'s default), else None."""
    for p in (Path(path), Path(path) / "features"):
        if _is_eval(p):
            return p
    return None


def cache_kind(path: str | Path) -> tuple[Kind, Path]:
    """('scaffold' | 'eval', folder) of a cache path, or a clear error."""
    path = Path(path)
    if (M.meta_dir(path) / "header.json").is_file():
        return "scaffold", path
    ev = eval_root(path)
    if ev is not None:
        return "eval", ev
    raise SndError(f"not a cache folder: {path}", path=path,
                   hint="pass a `snd precompute --out` store or an `snd eval` feature cache (<eval out>/features)")


# ---- scaffold stores ------------------------------------------------------------------------------
def _incomplete(root: Path, scenes: dict[str, dict]) -> dict[str, str]:
    """Incomplete scene -> what is left of it (failure marker, unmarked group, temp folders of a write)."""
    out: dict[str, list[str]] = {}
    for name, rec in scenes.items():
        if rec.get("status") != "complete":
            out.setdefault(name, []).append(f"failed: {rec.get('error', '?')}")
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(("_", ".")) and (d / "zarr.json").is_file() \
                and M.complete_record(root, d.name) is None:
            out.setdefault(d.name, []).append("group without a completion marker")
    tdir = M.tmp_dir(root)
    for t in sorted(tdir.iterdir()) if tdir.is_dir() else []:
        out.setdefault(t.name.rsplit(".", 1)[0], []).append(f"temp folder {t.name}")
    return {k: "; ".join(v) for k, v in sorted(out.items())}


def _arrays(root: Path, complete: list[str]) -> dict[str, dict]:
    """Per array: dtype, shape per row (first scene), stored bytes over every complete scene."""
    import zarr

    out: dict[str, dict] = {}
    for i, name in enumerate(complete):
        for d in sorted(p for p in (root / name).iterdir() if p.is_dir()):
            a = out.setdefault(d.name, {"bytes": 0})
            a["bytes"] += folder_bytes(d)
            if "dtype" not in a:
                try:
                    arr = zarr.open_array(str(d), mode="r")
                    a.update(dtype=str(arr.dtype), row_shape=list(arr.shape[1:]))
                except Exception as e:  # noqa: BLE001 - info reports, `verify` judges
                    a.update(dtype="?", error=f"{type(e).__name__}: {e}"[:200])
    return out


def _runs(root: Path) -> list[dict]:
    keys = ("rank", "world_size", "device_name", "scenes_done", "scenes_skipped", "failed", "pairs", "seconds", "pairs_per_s")
    rdir = M.meta_dir(root) / "runs"
    runs = []
    for p in sorted(rdir.glob("*.json")) if rdir.is_dir() else []:
        if p.name.startswith("."):
            continue
        r = _json(p)
        runs.append({"file": p.name, **{k: r[k] for k in keys if k in r}})
    return runs


def scaffold_info(root: str | Path) -> dict[str, Any]:
    """Everything `snd cache info` shows about a scaffold store (JSON-ready)."""
    root = Path(root)
    man = M.read_manifest(root)
    header = {k: v for k, v in man.items() if k != "scenes"}
    recs = {n: r for n, r in man["scenes"].items() if r.get("status") == "complete"}
    pairs = sum(int(r["pairs"]) for r in recs.values())
    nbytes = sum(int(r["bytes"]) for r in recs.values())
    arrays = _arrays(root, sorted(recs))
    info = {
        "kind": "scaffold", "path": str(root), "header": header,
        "scenes": {"complete": len(recs), "incomplete": _incomplete(root, man["scenes"])},
        "pairs": pairs, "targets": sum(int(r.get("items", 0)) for r in recs.values()),
        "bytes": nbytes, "mb_total": nbytes / _MB, "mb_per_pair": nbytes / _MB / pairs if pairs else None,
        "disk_mb": folder_bytes(root) / _MB,
        "images_stored": header.get("images") is not None,  # v3 header: the frame codec, None with --images off
        "arrays": {k: {**v, "mb_per_pair": v["bytes"] / _MB / pairs if pairs else None} for k, v in arrays.items()},
        "runs": _runs(root),
        "frames": sum(int(r.get("frames", 0)) for r in recs.values()),  # stored frames (v3 marker field; 0 without)
    }
    info["split"] = size_split(info)
    return info


def size_split(info: dict[str, Any]) -> dict[str, Any]:
    """MB per pair of a scaffold store in three parts: `scaffold` (the per-pair fields, masks, cameras and
    checksums), `operators` (`op_*`) and `frames` (`frame_*`), plus MB per stored frame and pairs per frame.

    Why apart: the first two are per pair whatever the sampler; frames are stored once per frame and shared
    by every pair that uses one, so their MB/pair is MB/frame / pairs-per-frame and a short run (few pairs
    per scene) overstates it against the paper's 180 pairs per ~600-frame scene."""
    parts = {"scaffold": 0.0, "operators": 0.0, "frames": 0.0}
    for name, a in info["arrays"].items():
        part = "operators" if name.startswith("op_") else "frames" if name.startswith("frame_") else "scaffold"
        parts[part] += a["bytes"] / _MB
    pairs, frames = info["pairs"], info.get("frames", 0)
    img = info.get("header", {}).get("images") or {}
    return {"mb_per_pair": {k: v / pairs if pairs else None for k, v in parts.items()},
            "frames": frames, "pairs_per_frame": pairs / frames if frames else None,
            "mb_per_frame": parts["frames"] / frames if frames else None,
            # lossless frames' filter (v5 "grad"; "row" before, where the header does not say): it sets their size
            "frame_filter": (img.get("filter") or "row") if img.get("codec") == "lossless" else None}


# ---- evaluation caches ----------------------------------------------------------------------------
def row_stores(folder: Path) -> list[dict]:
    """The row stores (`<stem>.json` + `<stem>.zarr`) of one dataset folder of an evaluation cache."""
    out = []
    for j in sorted(folder.glob("*.json")):
        if j.name.startswith("."):
            continue
        st, z = _json(j), j.with_suffix(".zarr")
        out.append({"dataset": folder.name, "store": j.stem, "rows": st.get("n"), "rows_done": st.get("n_done"),
                    "complete": bool(st.get("complete")) and z.is_dir(), "mb": folder_bytes(z) / _MB if z.is_dir() else 0.0,
                    **{k: st[k] for k in ("task", "precision", "img_hw") if k in st}})
    return out


def eval_keys(root: Path) -> list[Path]:
    """Backbone key folders of an evaluation cache (every folder but `targets/` and hidden ones)."""
    return [d for d in sorted(root.iterdir()) if d.is_dir() and d.name != "targets" and not d.name.startswith((".", "_"))]


def eval_info(root: str | Path) -> dict[str, Any]:
    """Per backbone key and dataset: rows, size, complete or not; and the shared target stores."""
    root = Path(root)
    keys = []
    for d in eval_keys(root):
        model = _json(d / "model.json") if (d / "model.json").is_file() else {"error": "no model.json"}
        stores = [s for ds in sorted(p for p in d.iterdir() if p.is_dir()) for s in row_stores(ds)]
        precs = sorted({s.get("precision", "fp32") for s in stores}) or [model.get("precision", "?")]
        keys.append({"key": d.name, "weights_sha256": model.get("weights_sha256"), "precision": model.get("precision", precs[0]),
                     "img_hw": model.get("img_hw"), "dim": model.get("dim"), "version": model.get("version"),
                     "mb": folder_bytes(d) / _MB, "stores": stores})
    tdir = root / "targets"
    targets = [s for ds in sorted(p for p in tdir.iterdir() if p.is_dir()) for s in row_stores(ds)] if tdir.is_dir() else []
    return {"kind": "eval", "path": str(root), "keys": keys, "targets": targets, "disk_mb": folder_bytes(root) / _MB}


def cache_info(path: str | Path) -> dict[str, Any]:
    kind, root = cache_kind(path)
    return scaffold_info(root) if kind == "scaffold" else eval_info(root)


# ---- text ---------------------------------------------------------------------------------------
def _flat(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(d, dict) and d:
        return [kv for k, v in d.items() for kv in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, json.dumps(d) if not isinstance(d, str) else d)]


def print_info(info: dict, console) -> None:
    """Rich tables of a `cache_info` dict."""
    from rich.table import Table

    def table(title: str, cols: list[str], rows: list[list[Any]]) -> None:
        # fold, never "…": piped output is 80 columns, and the key is what `snd cache gc --keep` takes
        t = Table(title=title, title_justify="left")
        for c in cols:
            t.add_column(c, overflow="fold", min_width=16 if c == "key" else None)
        for r in rows:
            t.add_row(*[("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r])
        console.print(t)

    if info["kind"] == "scaffold":
        hdr = {k: v for k, v in info["header"].items() if k not in ("config", "totals")}
        table(f"scaffold store {info['path']}", ["header field", "value"], [list(kv) for kv in _flat(hdr)])
        sc = info["scenes"]
        table("contents", ["quantity", "value"], [
            ["scenes complete", sc["complete"]], ["scenes incomplete", len(sc["incomplete"])], ["pairs", info["pairs"]],
            ["targets (items)", info["targets"]], ["MB total (complete scenes)", info["mb_total"]],
            ["MB per pair", info["mb_per_pair"]], ["MB on disk", info["disk_mb"]],
            ["images stored", "yes" if info["images_stored"] else "no (read from the dataset)"],
            *[[f"MB per pair: {k}", v] for k, v in info["split"]["mb_per_pair"].items()],
            ["frames stored (once each)", info["frames"]], ["pairs per frame", info["split"]["pairs_per_frame"]]])
        table("arrays", ["array", "dtype", "shape per pair", "MB per pair"],
              [[k, a.get("dtype"), a.get("row_shape"), a.get("mb_per_pair")] for k, a in info["arrays"].items()])
        if sc["incomplete"]:
            table("incomplete scenes (snd cache gc removes the leftovers)", ["scene", "left"], [list(kv) for kv in sc["incomplete"].items()])
        if info["runs"]:
            cols = ["file", "rank", "world_size", "device_name", "scenes_done", "pairs", "seconds", "pairs_per_s"]
            table("runs recorded", ["file", "rank", "of", "device", "scenes", "pairs", "s", "pairs/s"],
                  [[r.get(c) for c in cols] for r in info["runs"]])
        console.print("(full precompute config: --json)")
        return
    # seven narrow columns fit 80 (the weights' SHA-256 is in --json; the key names them for `gc --keep`)
    rows = [[k["key"], k["precision"], "x".join(map(str, k["img_hw"] or [])) or None, f"{s['dataset']}/{s['store']}",
             s["rows"], s["complete"], s["mb"]] for k in info["keys"] for s in (k["stores"] or [{"dataset": "-", "store": "-",
                                                                                             "rows": 0, "complete": "-", "mb": 0.0}])]
    table(f"evaluation cache {info['path']} ({info['disk_mb']:.1f} MB)",
          ["key", "precision", "input", "store", "rows", "done", "MB"], rows)
    if info["targets"]:
        table("targets (model-independent)", ["dataset", "store", "task", "rows", "complete", "MB"],
              [[s["dataset"], s["store"], s.get("task"), s["rows"], s["complete"], s["mb"]] for s in info["targets"]])
