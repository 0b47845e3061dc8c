#!/usr/bin/env bash
# The README's real commands as a new user runs them, timed end to end (warm-ups and builds included), on
# procedural scenes at ScanNet++'s DSLR size, plus `snd bench distill` streaming the same store in the same
# device call (issue #20: default `snd distill` must reach >= 95 % of the bench's fast path).
# Usage (GPU machine, repo root): OUT=/tmp/out bash scripts/e2e_commands.sh
#   env: H, W (584x876), SCENES (4), FRAMES (60), PAIRS (60 per scene), ITERS (2500), MVSPLAT_CKPT (optional:
#   adds `snd precompute --source mvsplat`), WORK (/tmp/snd-e2e)
# Writes $OUT/e2e.json: wall seconds per command, precompute pairs/s and MB/pair (from the store's run
# records), distill it/s (metrics.jsonl, last window and mean of the last half), bench it/s.
set -uo pipefail
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/snd-e2e}; mkdir -p "$OUT" "$WORK"
H=${H:-584}; W=${W:-876}; SCENES=${SCENES:-4}; FRAMES=${FRAMES:-60}; PAIRS=${PAIRS:-60}; ITERS=${ITERS:-2500}
IH=$((H / 14 * 14)); IW=$((W / 14 * 14))
snd() { python3 -m snd.cli "$@"; }
t() { local name=$1; shift; local t0=$EPOCHREALTIME; "$@" > "$OUT/e2e_$name.log" 2>&1; local rc=$?
      echo "{\"name\": \"$name\", \"rc\": $rc, \"wall_s\": $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))")}" >> "$WORK/walls.jsonl"
      tail -4 "$OUT/e2e_$name.log"; }
rm -f "$WORK/walls.jsonl"
[[ -d $WORK/data ]] || t synth snd data synth --out "$WORK/data" --scenes "$SCENES" --frames "$FRAMES" --height "$H" --width "$W"
rm -rf "$WORK/cache_depth" "$WORK/cache_mvsplat" "$WORK/runs"
t precompute_depth snd precompute --data "$WORK/data" --split all --out "$WORK/cache_depth" --source depth \
  --height "$H" --width "$W" --pairs-per-scene "$PAIRS" --device cuda
if [[ -n ${MVSPLAT_CKPT:-} ]]; then
  t precompute_mvsplat snd precompute --data "$WORK/data" --split all --out "$WORK/cache_mvsplat" --source mvsplat \
    --mvsplat-ckpt "$MVSPLAT_CKPT" --height "$H" --width "$W" --pairs-per-scene "$PAIRS" --device cuda
fi
mv "$WORK/data" "$WORK/data.hidden"  # stage two must not need the dataset
t distill snd distill --shards "$WORK/cache_depth" --run "$WORK/runs/vits" --model vit_small_patch14_dinov2 --init random \
  --img-height "$IH" --img-width "$IW" --iters "$ITERS"
t bench_distill snd bench distill --shards "$WORK/cache_depth" --models vit_small_patch14_dinov2 --paths fast \
  --img-height "$IH" --img-width "$IW" --scaffold-height "$H" --scaffold-width "$W" --iters 200 --warmup 20 \
  --out "$OUT/e2e_bench_distill.json"
mv "$WORK/data.hidden" "$WORK/data"
python3 - "$WORK" "$OUT" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {"walls": [json.loads(x) for x in (work / "walls.jsonl").read_text().splitlines()]}
for store in sorted(work.glob("cache_*")):
    runs = [json.loads(p.read_text()) for p in sorted((store / "_snd" / "runs").glob("*.json"))]
    if runs:
        r = runs[-1]
        res[store.name] = {k: r[k] for k in ("pairs", "seconds", "pairs_per_s", "steady_pairs_per_s", "phase_s")}
        res[store.name]["mb_per_pair"] = r["bytes"] / 1e6 / max(r["pairs"], 1)
rows = [json.loads(x) for x in (work / "runs" / "vits" / "metrics.jsonl").read_text().splitlines()]
half = rows[len(rows) // 2:]
res["distill"] = {"path": rows[-1].get("path"), "it_per_s_last": rows[-1].get("it_per_s"),
                  "it_per_s_last_half": sum(r["it_per_s"] for r in half) / len(half)}
b = json.loads((out / "e2e_bench_distill.json").read_text())["models"][0]["paths"]["fast"]
res["bench_fast"] = {"it_per_s": b["it_per_s"], "num_workers": b.get("num_workers"), "data_wait_ms_per_step": b["data_wait_ms_per_step"]}
res["distill_vs_bench"] = res["distill"]["it_per_s_last_half"] / b["it_per_s"]
(out / "e2e.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
