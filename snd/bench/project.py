"""`snd bench project`: the paper-scale workflow (280 scenes, 50k pairs, 50k steps, the eval suite) on one
H100, projected from the bench JSONs measured so far.

Why a command and not a table typed by hand: the figures come from different device calls, machines and code
versions; the projection names the file and key of every figure, the device it was measured on, and what is
still missing, so a reader sees which hours are measured on the target GPU and which are stand-ins. Rates
come only from GPU JSONs (a file ending `_cpu.json` gives sizes, never rates).

Each figure defaults to the newest file in `--bench-dir` that has it ("newest": the last commit that touched
the file, or its modification time when it is untracked or edited; ties go to the first name in sort order).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

from snd.errors import SndError
from snd.pipeline.config import BenchProjectConfig, PrecomputeConfig

__all__ = ["project", "frames_per_pair", "newest_first"]

TARGET_DEVICE = "H100"  # the machine: figures from another GPU are marked as stand-ins


@dataclass
class Figure:
    """One measured number and where it comes from."""

    value: Optional[float]
    unit: str
    file: Optional[str] = None
    key: Optional[str] = None
    device: Optional[str] = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"value": self.value, "unit": self.unit, "file": self.file, "key": self.key, "device": self.device}
        if self.device is not None:
            d["on_target_device"] = TARGET_DEVICE in self.device
        if self.note:
            d["note"] = self.note
        return {**d, **self.extra}


# ---- which file -----------------------------------------------------------------------------------
def _age(path: Path) -> float:
    """Commit time of the last commit touching `path` if it is tracked and unchanged, else its mtime."""
    try:
        cwd = str(path.parent)
        ts = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path.name], cwd=cwd, capture_output=True,
                            text=True, timeout=10).stdout.strip()
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], cwd=cwd, capture_output=True,
                               timeout=10).returncode == 0
        if ts and clean:
            return float(ts)
    except (OSError, subprocess.SubprocessError):
        pass
    return path.stat().st_mtime


def newest_first(folder: Path, pattern: str) -> list[Path]:
    """Files of `folder` matching `pattern`, newest first (ties: name order)."""
    files = sorted(Path(folder).glob(pattern))
    ages = {p: _age(p) for p in files}
    return sorted(files, key=lambda p: -ages[p])  # stable: equal ages keep name order


def _load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SndError(f"cannot read bench JSON {path}: {e}", path=path, hint="pass a JSON written by `snd bench ...`") from e


Getter = Callable[[dict, str], Optional[Figure]]


def _find(name: str, given: Optional[Path], folder: Path, pattern: str, get: Getter, *, rates: bool = True) -> Figure:
    """The figure `get` reads from the given file, else from the newest file of `folder` having it."""
    lacking = ""
    if given is not None:
        if not Path(given).is_file():
            raise SndError(f"no bench JSON at {given}", path=given, hint=f"pass a file, or leave the option out to use the newest {pattern}")
        fig = get(_load(given), str(given))
        if fig is not None:
            return fig
        lacking = f"{given} has no {name}; "
    for p in newest_first(folder, pattern) if Path(folder).is_dir() else []:
        if rates and p.name.endswith("_cpu.json"):
            continue
        fig = get(_load(p), str(p))
        if fig is not None:
            fig.note = "; ".join(x for x in (lacking + "taken from the newest file having it", fig.note) if x) if lacking else fig.note
            return fig
    return Figure(None, "", note=f"missing: {lacking}no {pattern} in {folder} has it")


# ---- figures --------------------------------------------------------------------------------------
def _precompute_rate(r: dict, f: str) -> Optional[Figure]:
    rate, e2e, n = r.get("pairs_per_s"), r.get("pairs_per_s_end_to_end"), r.get("pairs_total")
    if not rate or str(r.get("source", {}).get("name", "mvsplat")) != "mvsplat":
        return None
    warm = max(0.0, n / e2e - n / rate) if e2e and n else 0.0  # a short run's start-up: builds, compile, warm-up batches
    frames = r.get("images")
    note = "" if frames not in (None, "off") else "store written without frames (measured before they were stored)"
    return Figure(rate, "pairs/s", f, "pairs_per_s", r.get("device_name"), note,
                  {"warmup_s": warm, "warmup_key": "pairs_total / pairs_per_s_end_to_end - pairs_total / pairs_per_s",
                   "images": frames, "batch_pairs": r.get("batch_pairs"), "mb_per_pair": r.get("mb_per_pair"),
                   "size_split": r.get("size_split"), "operator_chunk": r.get("operator_chunk")})


def _distill(path: str) -> Callable[[str], Getter]:
    def for_model(model: str) -> Getter:
        def get(r: dict, f: str) -> Optional[Figure]:
            for i, m in enumerate(r.get("models", [])):
                if m.get("model") != model or path not in m.get("paths", {}):
                    continue
                if m.get("targets_protocol", "official") != "official":  # the default rules only
                    continue
                p = m["paths"][path]
                note = "" if "targets_protocol" in m else "measured before the official targets protocol"
                return Figure(p["it_per_s"], "it/s", f, f"models[{i}].paths.{path}.it_per_s", m.get("device"), note,
                              {"warmup_s": p.get("warmup_s") or 0.0, "compile": r.get("config", {}).get("compile")})
            return None
        return get
    return for_model


def _eval_hours(protocol: str) -> Getter:
    def get(r: dict, f: str) -> Optional[Figure]:
        if protocol == "paper":
            h = (r.get("paper") or {}).get("suite_hours_paper")
            key = "paper.suite_hours_paper"
        else:
            h = (r.get("projected") or {}).get("suite_hours_one_model")
            key = "projected.suite_hours_one_model"
        if h is None:
            return None
        return Figure(h, "h", f, key, r.get("device"), "projected from measured rates at the real datasets' sizes",
                      {"suite_hours_with_baseline": (r.get("projected") or {}).get("suite_hours_with_baseline")})
    return get


def _size(r: dict, f: str) -> Optional[Figure]:
    """MVSplat's scaffold MB/pair and its operators' (when a run built them)."""
    mv = [x for x in r.get("runs", []) if x.get("source") == "mvsplat"]
    if not mv:
        return None
    ops = [x["split"]["mb_per_pair"]["operators"] for x in mv if x.get("operator")]
    return Figure(mv[0]["split"]["mb_per_pair"]["scaffold"], "MB/pair", f, "runs[source=mvsplat].split.mb_per_pair.scaffold",
                  r.get("device"), r.get("note", ""), {"operators": ops[0] if ops else None})


def _frames(codec: str) -> Getter:
    """MB per stored frame of `codec` as written today (any source: frames do not depend on it)."""
    def get(r: dict, f: str) -> Optional[Figure]:
        for i, x in enumerate(r.get("runs", [])):
            if x.get("images") == codec and x["split"].get("mb_per_frame") and _current_frames(codec, x["split"]):
                return Figure(x["split"]["mb_per_frame"], "MB/frame", f, f"runs[{i}].split.mb_per_frame", r.get("device"),
                              "", {"frame_filter": x["split"].get("frame_filter")})
        return None
    return get


def _current_frames(images: str, split: dict) -> bool:
    """Whether a run's stored frames are what `snd precompute --images` writes today: JPEG, or lossless with the
    v5 ``grad`` filter (runs from before recorded no filter: their lossless frames were row-filtered, ~17 % larger)."""
    return images != "lossless" or split.get("frame_filter") == "grad"


def _disk(figs: dict[str, Figure], fpp: float, pairs: int) -> tuple[dict, dict]:
    """Store size per frame codec at the paper's sampler, and where each part comes from. Scaffold and operators,
    best first: a GPU `snd bench precompute` run with operators (one store); else the size JSON's MVSplat scaffold,
    its operators when it built them, else the operators' MB/pair as the difference of the GPU runs with and
    without operators (same source and batch, stores without frames). MB per frame: that GPU run's when its frames
    are stored as today (`_current_frames`), else the newest size JSON's for the codec."""
    pre, nop, sz = figs["precompute_operators"], figs["precompute_no_operator"], figs["store_size"]
    frames = {c: figs[f"frames_{c}"] for c in ("lossless", "jpeg") if figs[f"frames_{c}"].value is not None}
    mbf, frames_from = {c: f.value for c, f in frames.items()}, {c: f.file for c, f in frames.items()}
    gpu = pre.extra.get("size_split") if pre.value is not None else None
    if gpu and gpu["mb_per_pair"]["operators"] and gpu.get("mb_per_frame"):
        scaffold, ops = gpu["mb_per_pair"]["scaffold"], gpu["mb_per_pair"]["operators"]
        if _current_frames(pre.extra["images"], gpu):  # its own frames, when stored as `snd precompute` stores them now
            mbf[pre.extra["images"]], frames_from[pre.extra["images"]] = gpu["mb_per_frame"], pre.file
        src = {"scaffold": pre.file, "operators": pre.file, "frames": frames_from}
    elif sz.value is not None:
        scaffold, ops = sz.value, sz.extra["operators"]
        src = {"scaffold": sz.file, "operators": sz.file, "frames": frames_from}
        if ops is None and pre.extra.get("mb_per_pair") and nop.extra.get("mb_per_pair"):
            ops = pre.extra["mb_per_pair"] - nop.extra["mb_per_pair"]
            src["operators"] = f"{pre.file} - {nop.file} (mb_per_pair, {pre.device})"
        if ops is None:
            return {}, {"operators": "missing: no MVSplat store with operators measured"}
    else:
        return {}, {}
    disk = {}
    for codec, m in mbf.items():
        per_pair = scaffold + ops + m * fpp
        disk[codec] = {"mb_per_pair": per_pair, "scaffold": scaffold, "operators": ops, "frames": m * fpp, "mb_per_frame": m,
                       "gb": per_pair * pairs / 1e3, "goal_mb_per_pair": 8.0, "goal_met": per_pair <= 8.0}
    return disk, src


# ---- the sampler's frames per pair ---------------------------------------------------------------
def frames_per_pair(frames_per_scene: int, *, pairs_per_scene: int, targets_per_pair: int, gap_min: int, gap_max: int,
                    scenes: int = 16, seed: int = 0) -> float:
    """Distinct frames stored per pair by `snd precompute`'s sampler on scenes of `frames_per_scene` frames
    (mean over `scenes` scene names): frames are stored once per scene, so this sets their MB/pair."""
    from snd.data.pairs import sample_pairs

    used = kept = 0
    for s in range(scenes):
        sc = SimpleNamespace(name=f"scene{s}", frame_ids=[f"DSC{i:05d}.JPG" for i in range(frames_per_scene)])
        pairs = sample_pairs(sc, gap_min=gap_min, gap_max=gap_max, pairs_per_scene=pairs_per_scene,
                             targets_per_pair=targets_per_pair, seed=seed)
        used += len({i for p in pairs for i in (*p.ctx, *p.targets)})
        kept += len(pairs)
    return used / kept


def _newest_e2e(d: Path) -> Optional[dict]:
    """The newest `scripts/e2e_commands.sh` result in the bench folder (e2e_*.json with `distill_vs_bench`):
    the default `snd distill` against `snd bench distill` on the same store, in one device call; `runs` lists
    every such file's ratio (runs on different hosts differ: the loader's speed depends on the CPUs).
    Newest by commit time (as `newest_first`); among files of one commit the last name (run numbers grow)."""
    files = sorted(d.glob("e2e_*.json"), reverse=True) if d.is_dir() else []
    ages = {p: _age(p) for p in files}
    runs = []
    for p in sorted(files, key=lambda p: -ages[p]):
        r = json.loads(p.read_text())
        if "distill_vs_bench" in r:
            runs.append({"ratio": r["distill_vs_bench"], "goal": r.get("distill_vs_bench_goal"), "file": str(p),
                         "distill_it_per_s": r["distill"]["it_per_s_last_half"], "bench_it_per_s": r["bench_fast"]["it_per_s"],
                         "bench_data_wait_ms_per_step": r["bench_fast"].get("data_wait_ms_per_step")})
    return {**runs[0], "runs": runs} if runs else None


# ---- the projection -------------------------------------------------------------------------------
def _hours(fig: Figure, work: float) -> Optional[float]:
    return (fig.extra.get("warmup_s", 0.0) + work / fig.value) / 3600 if fig.value else None


def project(cfg: BenchProjectConfig) -> dict:
    """Wall hours per stage and store size of the paper-scale workflow, each with the figures it rests on."""
    d = Path(cfg.bench_dir)
    if not d.is_dir() and None in (cfg.precompute, cfg.precompute_no_operator, cfg.distill, cfg.eval, cfg.size):
        raise SndError(f"no bench folder {d}", path=d, hint="run from the repository root, pass --bench-dir, or give every file")
    pre = PrecomputeConfig
    figs = {
        "precompute_operators": _find("pairs/s with operators", cfg.precompute, d, "bench_precompute_mvsplat_operators*.json", _precompute_rate),
        "precompute_no_operator": _find("pairs/s without operators", cfg.precompute_no_operator, d,
                                        "bench_precompute_mvsplat_no_operator*.json", _precompute_rate),
        "distill_fast": _find(f"{cfg.model} fast-path it/s", cfg.distill, d, "bench_distill_*.json", _distill("fast")(cfg.model)),
        "distill_render": _find(f"{cfg.model} render-path it/s", cfg.distill, d, "bench_distill_*.json", _distill("render")(cfg.model)),
        "eval_suite": _find(f"{cfg.eval_protocol}-protocol suite hours", cfg.eval, d, "bench_eval_*.json", _eval_hours(cfg.eval_protocol)),
        "store_size": _find("MVSplat store size", cfg.size, d, "store_size_*.json", _size, rates=False),
        **{f"frames_{c}": _find(f"MB per {c} frame as stored today", cfg.size, d, "store_size_*.json", _frames(c), rates=False)
           for c in ("lossless", "jpeg")},
    }
    if cfg.eval_protocol == "paper" and figs["eval_suite"].value is None:  # stand-in: the fast protocol's hours
        figs["eval_suite_fast"] = _find("fast-protocol suite hours", cfg.eval, d, "bench_eval_*.json", _eval_hours("fast"))
    fpp = frames_per_pair(cfg.frames_per_scene, pairs_per_scene=pre.pairs_per_scene, targets_per_pair=pre.targets_per_pair,
                          gap_min=pre.gap_min, gap_max=pre.gap_max)
    P, S = cfg.pairs, cfg.steps
    ev_fig = "eval_suite" if figs["eval_suite"].value is not None or "eval_suite_fast" not in figs else "eval_suite_fast"
    ev = figs[ev_fig].value
    workflows = {}
    for name, pre_fig, dist_fig, why in (
            ("default", "precompute_operators", "distill_fast", "`snd precompute` (operators, the default) then `snd distill` on the fast path"),
            ("no_operator", "precompute_no_operator", "distill_render", "`snd precompute --no-operator` then `snd distill` rendering targets")):
        h = {"precompute_h": _hours(figs[pre_fig], P), "distill_h": _hours(figs[dist_fig], S), "eval_h": ev}
        total = None if None in h.values() else sum(h.values())
        workflows[name] = {"what": why, **h, "total_h": total, "figures": [pre_fig, dist_fig, ev_fig]}
    disk, disk_from = _disk(figs, fpp, P)
    missing = {k: f.note for k, f in figs.items() if f.value is None}
    if ev_fig == "eval_suite_fast":
        missing["eval_suite"] += " (eval_h uses the fast protocol's hours: `snd bench eval --protocol paper` on the GPU)"
    stand_ins = {k: f.device for k, f in figs.items() if f.value is not None and f.device and TARGET_DEVICE not in f.device
                 and k != "store_size" and not k.startswith("frames_")}
    e2e = _newest_e2e(d)
    not_yet = {
        # only the batched builder records the chunk it settled on
        "batched_operators": None if figs["precompute_operators"].extra.get("operator_chunk") else
                             f"stage one with operators built batched on the GPU (issue 20's goal >= 30 pairs/s): unless "
                             f"{figs['precompute_operators'].file} was written by that builder, its rate is the per-target one's",
        "precompute_with_frames": ", ".join(f"{k}: measured without writing frames" for k in ("precompute_operators", "precompute_no_operator")
                                            if figs[k].value is not None and figs[k].extra.get("images") in (None, "off")) or None,
        "default_distill_vs_bench": None if e2e else "the default `snd distill` streaming a store with frames vs the bench "
                                                     "(goal >= 95 %): `bash scripts/gpu_session.sh e2e`",
    }
    out = {
        "workflow": {"scenes": cfg.scenes, "pairs": P, "steps": S, "model": cfg.model, "eval_protocol": cfg.eval_protocol,
                     "frames_per_scene": cfg.frames_per_scene, "pairs_per_scene": pre.pairs_per_scene, "frames_per_pair": fpp,
                     "target_device": TARGET_DEVICE},
        "figures": {k: f.to_dict() for k, f in figs.items()},
        "workflows": workflows,
        "disk": disk,
        "disk_parts_from": disk_from,
        "missing": missing,
        "stand_ins_not_on_target_device": stand_ins,
        "not_yet_measured": {k: v for k, v in not_yet.items() if v},
        "default_distill_vs_bench": e2e,
        "note": "hours = warm-up measured in the same JSON + work / steady rate; the eval suite is one model's projected "
                "hours; disk = (scaffold + operators) per pair + MB per stored frame x frames per pair of the default "
                "sampler on frames_per_scene-frame scenes (random-init MVSplat: a trained one's fields compress differently)",
    }
    from snd.pipeline.jsonout import emit_json

    return emit_json(out, cfg.out)
