"""Markdown tables of probe results: the model beside the baseline, deltas with better/worse arrows, and the
paper's numbers where dataset and backbone size match.

Input is the list of result records written by `snd.stages.evaluate` (also in `results.json`):
`{"role": "model"|"baseline", "label", "size", "dataset", "task", "metrics": {name: float}, ...}`, and
optionally the trivial baselines (`results.json["trivial"]`, see `snd.eval.trivial`):
`{"dataset", "task", "predictor": str, "metrics": {name: float}, ...}`, shown as a "trivial" column so a
probe that learned nothing is visible at a glance.

Every table says which evaluation protocol made its numbers (`snd.eval.protocol`: "paper" or "fast"; a
record without the key predates protocols and is "fast"), and only paper-protocol tables carry the paper's
own numbers: fast numbers are not comparable to them (docs/evaluation.md gives how far apart they sit).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from snd.eval.paper import paper_number

__all__ = ["TASK_METRICS", "METRIC_LABEL", "lower_is_better", "format_value", "delta_cell", "task_table",
           "all_tables", "console_rows"]

TASK_TITLE = {"depth": "Monocular depth", "normals": "Surface normals", "seg": "Semantic segmentation",
              "corr": "Multi-view correspondence"}
TASK_METRICS = {
    "depth": ("abs_rel", "rmse", "log10", "delta1", "delta2", "delta3"),
    "normals": ("rmse", "mean", "median", "pct_11_25", "pct_22_5", "pct_30"),
    "seg": ("aAcc", "mIoU", "mAcc"),
    "corr": ("recall_5px", "recall_10px", "recall_20px", "recall_10px_rot_0-15", "recall_10px_rot_15-30",
             "recall_10px_rot_30-60", "recall_10px_rot_60-180"),
}
METRIC_LABEL = {
    ("depth", "abs_rel"): "AbsRel", ("depth", "rmse"): "RMSE (m)", ("depth", "log10"): "log10",
    ("depth", "delta1"): "δ<1.25", ("depth", "delta2"): "δ<1.25²", ("depth", "delta3"): "δ<1.25³",
    ("normals", "rmse"): "RMSE (°)", ("normals", "mean"): "mean (°)", ("normals", "median"): "median (°)",
    ("normals", "pct_11_25"): "<11.25° (%)", ("normals", "pct_22_5"): "<22.5° (%)", ("normals", "pct_30"): "<30° (%)",
    ("seg", "aAcc"): "aAcc (%)", ("seg", "mIoU"): "mIoU (%)", ("seg", "mAcc"): "mAcc (%)",
    ("corr", "recall_5px"): "recall@5px (%)", ("corr", "recall_10px"): "recall@10px (%)",
    ("corr", "recall_20px"): "recall@20px (%)", ("corr", "recall_10px_rot_0-15"): "recall@10px, rot 0–15° (%)",
    ("corr", "recall_10px_rot_15-30"): "recall@10px, rot 15–30° (%)",
    ("corr", "recall_10px_rot_30-60"): "recall@10px, rot 30–60° (%)",
    ("corr", "recall_10px_rot_60-180"): "recall@10px, rot 60–180° (%)",
}
_LOWER = {("depth", "abs_rel"), ("depth", "rmse"), ("depth", "log10"), ("normals", "rmse"), ("normals", "mean"),
          ("normals", "median")}
BETTER, WORSE, SAME = "▲", "▼", "="


def lower_is_better(task: str, metric: str) -> bool:
    return (task, metric) in _LOWER


def format_value(task: str, metric: str, v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if task == "depth":
        return f"{v:.4f}"
    return f"{v:.2f}"


def delta_cell(task: str, metric: str, model: Optional[float], base: Optional[float]) -> str:
    """'−0.0390 ▲' : model − baseline, ▲ when the model is better in the metric's direction, ▼ worse."""
    if model is None or base is None or math.isnan(model) or math.isnan(base):
        return "–"
    d = model - base
    text = format_value(task, metric, abs(d))
    if text.strip("0.") == "":
        return f"{text} {SAME}"
    sign = "+" if d > 0 else "−"
    better = (d < 0) if lower_is_better(task, metric) else (d > 0)
    return f"{sign}{text} {BETTER if better else WORSE}"


def record_protocol(r: dict) -> str:
    """The protocol of a result record ("fast" for records written before protocols existed)."""
    return r.get("protocol") or "fast"


def table_protocol(records: Iterable[dict], task: str) -> str:
    """"paper", "fast", or "mixed: ..." for the records of `task`."""
    ps = sorted({record_protocol(r) for r in records if r.get("task") == task and r.get("status", "ok") == "ok"})
    return ps[0] if len(ps) == 1 else "mixed: " + ", ".join(ps) if ps else "?"


def _index(records: Iterable[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["role"], r["dataset"], r["task"]): r for r in records if r.get("status", "ok") == "ok"}


def task_table(records: list[dict], task: str, *, heading: bool = True, trivial: Optional[list[dict]] = None) -> str:
    """One markdown table for `task`: rows (dataset, metric); columns model, baseline, Δ, trivial, paper rows."""
    idx = _index(records)
    triv = {t["dataset"]: t for t in (trivial or []) if t.get("task") == task}
    datasets = sorted({d for (_, d, t) in idx if t == task})
    if not datasets:
        return ""
    labels = {r["role"]: r["label"] for r in records if r.get("status", "ok") == "ok"}
    sizes = {r["role"]: r.get("size") for r in records if r.get("status", "ok") == "ok"}
    has_base = any(role == "baseline" and t == task for (role, _, t) in idx)
    # paper columns: the size of the model (or the baseline) when it is a ViT-S/B DINOv2 shape
    size = sizes.get("model") or sizes.get("baseline")
    protocol = table_protocol(records, task)
    paper_rows = [] if protocol != "paper" else [row for row in ("DINOv2", "SnD") if any(
        paper_number(size, d, task, row, m) is not None for d in datasets for m in TASK_METRICS[task])]
    head = ["dataset", "metric", f"model: {labels.get('model', '?')}"]
    if has_base:
        head += [f"baseline: {labels.get('baseline', '?')}", "Δ (model − baseline)"]
    has_triv = any(d in triv for d in datasets)
    if has_triv:
        head += ["trivial"]
    size_label = {"vits": "ViT-S", "vitb": "ViT-B"}.get(size or "", "")
    head += [f"paper {row} {size_label}" for row in paper_rows]
    lines = []
    if heading:
        lines.append(f"### {TASK_TITLE.get(task, task)} (protocol: {protocol})\n")
    else:
        lines.append(f"protocol: {protocol}\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for d in datasets:
        m = idx.get(("model", d, task), {}).get("metrics", {})
        b = idx.get(("baseline", d, task), {}).get("metrics", {})
        for metric in TASK_METRICS[task]:
            if metric not in m and metric not in b:
                continue
            arrow = "↓" if lower_is_better(task, metric) else "↑"
            cells = [d, f"{METRIC_LABEL.get((task, metric), metric)} {arrow}", format_value(task, metric, m.get(metric))]
            if has_base:
                cells += [format_value(task, metric, b.get(metric)), delta_cell(task, metric, m.get(metric), b.get(metric))]
            if has_triv:
                cells += [format_value(task, metric, triv.get(d, {}).get("metrics", {}).get(metric))]
            cells += [format_value(task, metric, paper_number(size, d, task, row, metric)) for row in paper_rows]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if protocol == "fast":
        lines.append("protocol fast = one cached pass at the probe input size: not the official protocol, so no "
                     "paper numbers are shown (docs/evaluation.md: how far fast numbers may sit from the paper's).")
    if has_base:
        lines.append(f"{BETTER} model better than the baseline, {WORSE} worse (per the metric's direction: ↓ lower is "
                     f"better, ↑ higher is better).")
    if has_triv:
        preds = "; ".join(f"{d}: {triv[d].get('predictor', '?')}" for d in datasets if d in triv)
        lines.append(f"trivial = a constant fit on the training split, scored on val with the same metrics ({preds}); "
                     f"a probe that does not beat it learned nothing from the features.")
    lines.append("")
    return "\n".join(lines)


def all_tables(records: list[dict], tasks: Iterable[str], *, notes: Optional[list[str]] = None,
               trivial: Optional[list[dict]] = None) -> str:
    """The combined report: one section per task with results, then notes (missing datasets etc.)."""
    parts = ["# snd probe results\n"]
    for t in tasks:
        tab = task_table(records, t, trivial=trivial)
        if tab:
            parts.append(tab)
    if notes:
        parts.append("### Not evaluated\n")
        parts += [f"- {n}" for n in notes]
        parts.append("")
    return "\n".join(parts)


def console_rows(records: list[dict], task: str, *, trivial: Optional[list[dict]] = None
                 ) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of `task_table` for a rich table (no markdown)."""
    md = task_table(records, task, heading=False, trivial=trivial)
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    if len(rows) < 2:
        return [], []
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    return split[0], split[2:]
