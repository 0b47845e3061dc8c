"""The few figures of a `snd bench ...` JSON that a device-session log needs, as one flat dict per file.

Why a module and not heredoc snippets in the session scripts: a snippet reading a key the JSON does not
have fails only on the GPU machine, after the figures were paid for; these functions are run by the CPU
tests on the JSONs the benches really write (tests/test_distill.py, test_eval_bench.py, test_precompute.py).

CLI (scripts/gpu_next.sh): `python -m snd.bench.summary KIND FILE [--append SUMMARY.jsonl]` with KIND one of
precompute, distill, eval: prints the dict as one JSON line and appends it to SUMMARY.jsonl.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["precompute", "distill", "eval_suite", "SUMMARIES"]


def _r(x: Any, nd: int = 3) -> Any:
    return round(x, nd) if isinstance(x, float) else x


def precompute(r: dict) -> dict:
    """`snd bench precompute`: steady and end-to-end pairs/s, ms per pair per phase, MB/pair and its split."""
    sp = r.get("size_split") or {}
    return {"device": r["device_name"], "source": r["source"]["name"], "operator": r.get("operator"), "images": r.get("images"),
            "operator_kernels": r.get("operator_kernels"), "mvsplat_corr_kernel": r.get("mvsplat_corr_kernel"),
            "operator_chunk": r.get("operator_chunk"), "operator_thread": r.get("operator_thread"),
            "operator_workers": r.get("operator_workers"), "operator_priority": r.get("operator_priority"),
            "gpu_busy": _r((r.get("gpu_busy") or {}).get("fraction")),
            "batch_pairs": r["batch_pairs"], "pairs_timed": r["pairs_timed"], "pairs_per_s": _r(r["pairs_per_s"]),
            "pairs_per_s_end_to_end": _r(r["pairs_per_s_end_to_end"]), "data_wait_frac": _r(r["data_wait_frac"]),
            "phase_ms_per_pair": {k: _r(v, 2) for k, v in r["phase_ms_per_pair"].items()},
            "mb_per_pair": _r(r["mb_per_pair"]), "mb_per_pair_split": {k: _r(v) for k, v in (sp.get("mb_per_pair") or {}).items()},
            "mb_per_frame": _r(sp.get("mb_per_frame")), "pairs_per_frame": _r(sp.get("pairs_per_frame")),
            "psnr_loss_db": _r((r.get("psnr") or {}).get("psnr_loss_db"), 5), "peak_mem_gib": _r(r.get("peak_mem_gib"), 2)}


def distill(r: dict) -> dict:
    """`snd bench distill`: it/s, warm-up, phases and peak memory per model and path."""
    out: dict[str, Any] = {"world_size": r.get("world_size", 1)}
    for m in r["models"]:
        for path, p in m["paths"].items():
            out[f"{m['model']}/{path}"] = {
                "device": m["device"], "img_hw": m["img_hw"], "it_per_s": _r(p["it_per_s"], 2), "warmup_s": _r(p["warmup_s"], 1),
                "phases_ms": {k: _r(v, 2) for k, v in p["phases_ms_median"].items()}, "data_wait_ms": _r(p.get("data_wait_ms_per_step"), 2),
                "gpu_busy": _r(p["gpu_busy_fraction"]), "peak_mem_gib": _r(p["peak_mem_gib"], 2), "skipped": p["skipped"]}
    return out


def eval_suite(r: dict) -> dict:
    """`snd bench eval`: projected suite hours (fast protocol, and the paper protocol's when it ran) and rates."""
    m, P, Q = r["measured"], r["projected"], r.get("paper") or {}
    return {"device": r["device"], "protocol": r.get("protocol"), "measured_s": _r(m["seconds"], 1),
            "extract_images_per_s": _r(m["extract_images_per_s"], 1), "corr_pairs_per_s": _r(m["corr_pairs_per_s"], 1),
            "probe_iters_per_s_alone": {t: {k: _r(v, 1) for k, v in p["train_iters_per_s_alone"].items()} for t, p in m["probes"].items()},
            "parts_s": {k: _r(v, 0) for k, v in P["parts_s"].items()},
            "suite_hours_one_model": _r(P["suite_hours_one_model"]), "suite_hours_with_baseline": _r(P["suite_hours_with_baseline"]),
            "suite_hours_paper": _r(Q.get("suite_hours_paper")),
            "per_task_hours_paper": {t: _r(v) for t, v in (Q.get("per_task_hours_paper") or {}).items()},
            "paper_goal_hours": Q.get("goal_hours"),
            # the live training sets' CPU side: items/s per worker, the workers used, CPU hours of all live items
            "augment_items_per_s_per_worker": {k: _r(v, 1) for k, v in (Q.get("augment_items_per_s_per_worker") or {}).items()},
            "workers": Q.get("workers"), "augment_core_hours": _r(Q.get("augment_core_hours")),
            "loader": {f"{x['task']}/{x['dataset']}": {"wait_s": _r(x["extra_s_parts"].get("loader_wait_s"), 0),
                                                       "workers_to_keep_up": x["workers_to_keep_up"]}
                       for x in Q.get("rows", []) if "workers_to_keep_up" in x}}


SUMMARIES: dict[str, Callable[[dict], dict]] = {"precompute": precompute, "distill": distill, "eval": eval_suite}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4) or argv[0] not in SUMMARIES or (len(argv) == 4 and argv[2] != "--append"):
        print(f"usage: python -m snd.bench.summary {{{','.join(SUMMARIES)}}} FILE [--append SUMMARY.jsonl]", file=sys.stderr)
        return 2
    kind, f = argv[0], Path(argv[1])
    try:
        row = {"kind": kind, "file": f.name, **SUMMARIES[kind](json.loads(f.read_text()))}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        row = {"kind": kind, "file": f.name, "error": f"{type(e).__name__}: {e}"}
    line = json.dumps(row)
    print(line)
    if len(argv) == 4:
        with open(argv[3], "a") as fh:
            fh.write(line + "\n")
    return 1 if "error" in row else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
