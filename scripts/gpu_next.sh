#!/usr/bin/env bash
# The figures still missing (docs/performance.md, "Figures still to measure on a GPU and how"), in ONE device call
# of < 560 s: steps in priority order, each under its own timeout, a step skipped when the budget left is below
# its estimate (so a later call can run it with STEPS=...). Results in $OUT: each bench's JSON and log,
# $OUT/next_steps.jsonl (rc and wall time per step, or why skipped), $OUT/next.jsonl (the figures of each JSON,
# `python -m snd.bench.summary`), $OUT/bench_project.json (`snd bench project` with this call's files).
# Usage (GPU machine, repo root): bash scripts/gpu_session.sh next   (that builds gsplat first; counts its time)
#   env: STEPS (default "fast-tests distill ops eval precompute"; any subset/order, e.g. STEPS="eval precompute" for
#   a second call), AB_BUILDER (a file: the ops step also times that builder against this one),
#   BUDGET_S (545: seconds since T_START, which gpu_session.sh sets when it starts; else now),
#   MODELS (the four below), FAST_K (pytest -k for fast-tests), PRE_PAIRS (64 timed pairs per `snd bench precompute`),
#   PRE_CODECS ("lossless jpeg": the frame codecs the precompute step times)
# Estimates (s; from earlier sessions' logs/JSONs, compile included): fast-tests 180 (five 30-step runs, each compiling
# a small ViT: ~35 s); distill per model 70 (DINOv3 140: its warm-up measured 109 s on the H200); ops 60 + 60
# (measured 31 + 25 s on an H100 before the fused kernel joined the profile)
# (H200 warm-up 45-49 s for ViT-S/14 and B/14, 61-74 s on the H100; DINOv3 B/16 109 s on the H200); eval-tests 120;
# bench eval 200 (measured 137 s + start); precompute 170 with a cold compile (MVSplat compile 98 s, gsplat
# ready), 110 warm; ckpt 40 + 40 (CPU: ~25 s for 3 rounds); add-ops 60 (after precompute, on its store).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=${T_START:-$EPOCHREALTIME}; BUDGET_S=${BUDGET_S:-545}
STEPS=${STEPS:-fast-tests distill ops eval precompute}
MODELS=${MODELS:-vit_small_patch14_dinov2 vit_small_patch16_dinov3 vit_base_patch14_dinov2 vit_base_patch16_dinov3}
PRE_PAIRS=${PRE_PAIRS:-64}
py() { python3 "$@"; }
left() { py -c "print(int($BUDGET_S - ($EPOCHREALTIME - $T0)))"; }
# step NAME EST_S TIMEOUT_S CMD...: run when the budget left covers the estimate, under min(timeout, left - 5)
step() {
  local name=$1 est=$2 to=$3; shift 3; local l; l=$(left)
  if (( l < est )); then
    echo "{\"step\": \"$name\", \"skipped\": \"budget: $l s left < estimate $est s\"}" >> "$OUT/next_steps.jsonl"
    echo "== $name skipped ($l s left < $est s)"; return 0
  fi
  (( to > l - 5 )) && to=$((l - 5))
  local t0=$EPOCHREALTIME
  case $1 in py) shift; set -- python3 "$@" ;; snd) shift; set -- python3 -m snd.cli "$@" ;; esac  # timeout runs programs, not functions
  timeout "$to" "$@" > "$OUT/next_$name.log" 2>&1; local rc=$?
  local wall; wall=$(py -c "print(round($EPOCHREALTIME - $t0, 1))")
  echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $wall, \"timeout_s\": $to, \"estimate_s\": $est}" >> "$OUT/next_steps.jsonl"
  echo "== $name rc=$rc ${wall}s ($(left) s left)"; grep -v "^ \|━" "$OUT/next_$name.log" | tail -4
}
summary() { [[ -f $2 ]] && py -m snd.bench.summary "$1" "$2" --append "$OUT/next.jsonl" | cut -c1-600; }
snd() { py -m snd.cli "$@"; }

for s in $STEPS; do case $s in
  fast-tests)  # (a) fast path vs eager (DINOv3 RoPE, both protocols, resume), operator vs gsplat targets
    # FAST_K (a pytest -k filter) runs a subset, e.g. FAST_K=dinov3 (one test, ~60 s) before timing DINOv3
    k=(); est=180; [[ -n ${FAST_K:-} ]] && k=(-k "$FAST_K") est=60
    step fast-tests $est 300 py -m pytest -q -m gpu tests/test_fast_path_gpu.py tests/test_packed.py "${k[@]}" -p no:cacheprovider --durations=10 ;;
  distill)  # (b) fast-path it/s per backbone, one call per model so a timeout keeps the others
    for m in $MODELS; do  # DINOv3: warm-up 109 s on the H200 (DINOv2 46 s); more when first (cold compile caches)
      est=70 to=150; [[ $m == *dinov3* ]] && est=140 to=260
      step "distill_$m" $est $to snd bench distill --models "$m" --paths fast --out "$OUT/bench_distill_fast_$m.json"
      summary distill "$OUT/bench_distill_fast_$m.json"
    done ;;
  ops)  # (b2) the batched operator builder: gsplat's list at chosen pixels and its adjoint (backward kernel) == the
    # full list; gsplat batched == one job per call == torch plan; then ms per target by chunk
    # (and stage one's operators on their own stream == queued behind the network, tests/test_precompute.py)
    step ops-tests 100 200 py -m pytest -m gpu tests/test_contrib.py tests/test_operator_batched.py tests/test_precompute.py \
      -p no:cacheprovider --durations=8
    step ops-profile 60 150 py scripts/gpu_profile_operator.py
    cp "$OUT/next_ops-profile.log" "$OUT/profile_operator_batched.jsonl" 2>/dev/null
    if [[ -n ${AB_BUILDER:-} && -f ${AB_BUILDER:-} ]]; then  # an earlier builder (e.g. `git show REV:snd/splat/operator_build.py
      # > ab_before.py`, untracked so it travels) against this one, twice each, alternating, chunk 8, same inputs
      for r in 1 2; do
        step "ops-ab-before-$r" 20 60 py scripts/gpu_profile_operator.py --builder "$AB_BUILDER" --chunks 8 --quick --tag before
        step "ops-ab-now-$r" 20 60 py scripts/gpu_profile_operator.py --chunks 8 --quick --tag now
      done
      cat "$OUT"/next_ops-ab-*.log > "$OUT/profile_operator_ab.jsonl" 2>/dev/null
    fi ;;
  precompute-ab)  # (d0) stage one with operators, lossless frames: on their own stream (the default) vs queued behind
    # MVSplat (--no-operator-stream), then the builder profiled on that store's random-init MVSplat scaffold
    est=170
    for mode in operator-stream no-operator-stream; do
      step "precompute_$mode" $est 260 snd bench precompute --source mvsplat --device cuda --images lossless --pairs "$PRE_PAIRS" \
        --"$mode" --workdir /tmp/snd-bench-pre --out "$OUT/bench_precompute_mvsplat_$mode.json"
      summary precompute "$OUT/bench_precompute_mvsplat_$mode.json"; est=110  # compile cache warm now
    done
    [[ -f $OUT/bench_precompute_mvsplat_operator-stream.json ]] && \
      cp "$OUT/bench_precompute_mvsplat_operator-stream.json" "$OUT/bench_precompute_mvsplat_operators_lossless.json"
    step ops-profile-store 60 120 py scripts/gpu_profile_operator.py --store /tmp/snd-bench-pre/cache --tag mvsplat_random_init
    cp "$OUT/next_ops-profile-store.log" "$OUT/profile_operator_store.jsonl" 2>/dev/null ;;
  eval|eval-tests|bench-eval)  # (c) the evaluation GPU tests, then the suite's time; --protocol paper also writes the fast protocol's
    # projection (`projected`: the same measured rates; the protocol only changes the arithmetic), so one run has both
    [[ $s == bench-eval ]] || step eval-tests 120 200 py -m pytest -q -m gpu tests/test_eval_probe_speed.py tests/test_eval_probes_together.py \
      tests/test_eval_probes_features.py tests/test_evaluate.py tests/test_eval_protocol.py tests/test_eval_mmseg.py \
      tests/test_eval_device_aug.py -p no:cacheprovider
    [[ $s == eval-tests ]] || step bench-eval 200 320 snd bench eval --model dinov2_vits14 --init random --device cuda --workers 8 --protocol paper \
      --out "$OUT/bench_eval_paper.json"
    [[ $s == eval-tests ]] || summary eval "$OUT/bench_eval_paper.json" ;;
  precompute-corr)  # (d1) MVSplat's GPU tests (the correlation kernel, aligned convolutions), then stage one with the
    # correlation kernel on (the default) and off (SND_CORR_KERNEL=off), lossless frames, on the same machine
    step corr-tests 60 120 py -m pytest -q -m gpu tests/test_mvsplat_corr_kernel.py tests/test_mvsplat_forward.py \
      -k "not compiled_matches" -p no:cacheprovider
    for k in on off; do
      SND_CORR_KERNEL=$k step "precompute_corr_$k" 170 260 snd bench precompute --source mvsplat --device cuda --images lossless \
        --pairs "$PRE_PAIRS" --workdir "/tmp/snd-bench-pre-corr-$k" --out "$OUT/bench_precompute_mvsplat_corr_$k.json"
      summary precompute "$OUT/bench_precompute_mvsplat_corr_$k.json"
    done ;;
  pipeline-ab)  # (d0b) stage one's pipeline variants over one compiled source (scripts/gpu_precompute_ab.py):
    # the default (two operator threads on CUDA) against one and against the main thread, chunk 8 against 24,
    # --no-operator as the ceiling; two timed rounds (ABBA), then one traced run each for the GPU's busy fraction
    # (AB_VARIANTS picks)
    step pipeline-ab 240 420 py scripts/gpu_precompute_ab.py --pairs "${AB_PAIRS:-96}" --rounds 2 --busy \
      --variants ${AB_VARIANTS:-thread workers1 inline chunk8 no-operator}
    grep '^{' "$OUT/next_pipeline-ab.log" > "$OUT/pipeline_ab.jsonl" 2>/dev/null ;;
  mvsplat-profile)  # (d2) MVSplat's compiled networks by kind of kernel with the correlation kernel on and off (two
    # compiles, ~130 s each on an H100), and the kernel alone at 9 launch shapes
    step mvsplat-profile 300 420 py scripts/gpu_profile_mvsplat.py --what corr compiled --corr-kernel on off
    grep '^{' "$OUT/next_mvsplat-profile.log" > "$OUT/profile_mvsplat.jsonl" 2>/dev/null ;;
  precompute)  # (d) stage one with operators (the default) writing frames, lossless (the default) and JPEG
    est=170
    for codec in ${PRE_CODECS:-lossless jpeg}; do
      step "precompute_$codec" $est 260 snd bench precompute --source mvsplat --device cuda --images $codec --pairs "$PRE_PAIRS" \
        --workdir /tmp/snd-bench-pre --out "$OUT/bench_precompute_mvsplat_operators_$codec.json"
      summary precompute "$OUT/bench_precompute_mvsplat_operators_$codec.json"; est=110  # compile cache warm now
    done ;;
  ckpt)  # (e) what a checkpoint costs the step loop: the device snapshot (default) against the host copy; then the GPU
    # tests of the writer, of the loop's asynchronous logging windows (snd.train.windows) and of the frames' GPU decode
    step ckpt-stall 40 90 py scripts/checkpoint_stall.py --device cuda --rounds 3
    cp "$OUT/next_ckpt-stall.log" "$OUT/checkpoint_stall_gpu.jsonl" 2>/dev/null
    step ckpt-tests 40 90 py -m pytest -q -m gpu tests/test_ckpt_writer.py tests/test_train.py tests/test_store_frames.py -p no:cacheprovider ;;
  kernels)  # (g) snd's two operator kernels (snd.splat.kernels: the slot adjoint, the direct rows): their GPU tests,
    # then the builder under each on/off config, alternating in one process (synthetic pairs, chunk 12), with the
    # direct kernel's rows checked against the torch glue's
    step kernels-tests 70 170 py -m pytest -q -m gpu tests/test_contrib.py tests/test_operator_batched.py -p no:cacheprovider
    # the A/B still runs after a failed test, but says so
    tail -1 "$OUT/next_steps.jsonl" | grep -q '"rc": 0,' || echo "kernels-tests failed: the kernels' timings below mean little" >&2
    step kernels-ab 60 120 py scripts/gpu_profile_operator.py --chunks 12 --quick --direct on --tag synthetic \
      --ab off/off on/off off/on on/on --rounds 2
    cp "$OUT/next_kernels-ab.log" "$OUT/profile_operator_kernels_ab.jsonl" 2>/dev/null ;;
  kernels-store)  # (g2) the same A/B on the stored random-init MVSplat scaffold the precompute step left
    step kernels-store 60 120 py scripts/gpu_profile_operator.py --store /tmp/snd-bench-pre/cache --chunks 12 --quick \
      --direct on --tag mvsplat_store --ab off/off on/off off/on on/on --rounds 2
    cp "$OUT/next_kernels-store.log" "$OUT/profile_operator_store_kernels_ab.jsonl" 2>/dev/null ;;
  add-ops)  # (f) `snd cache add-operators` on the store the precompute step left (MVSplat, random init): pairs/s on the GPU
    rm -rf /tmp/snd-addops
    step add-ops 60 200 snd cache add-operators /tmp/snd-bench-pre/cache --out /tmp/snd-addops --device cuda ;;
  *) echo "unknown step $s (fast-tests | distill | ops | precompute-ab | pipeline-ab | precompute-corr | mvsplat-profile | eval | eval-tests | bench-eval | precompute | ckpt | add-ops | kernels | kernels-store)"; exit 2 ;;
esac; done

# the paper-scale projection from this call's files (the others: the newest in docs/bench)
args=()
f="$OUT/bench_distill_fast_vit_small_patch14_dinov2.json"; [[ -f $f ]] && args+=(--distill "$f")
[[ -f $OUT/bench_eval_paper.json ]] && args+=(--eval "$OUT/bench_eval_paper.json")
[[ -f $OUT/bench_precompute_mvsplat_operators_lossless.json ]] && args+=(--precompute "$OUT/bench_precompute_mvsplat_operators_lossless.json")
snd bench project "${args[@]}" --out "$OUT/bench_project.json" > "$OUT/next_project.log" 2>&1
py -c "import json; r = json.load(open('$OUT/bench_project.json')); print('projection h', {k: {x: (round(v, 2) if isinstance(v, float) else v) for x, v in w.items() if x.endswith('_h')} for k, w in r['workflows'].items()}, 'disk', {k: round(v['mb_per_pair'], 2) for k, v in r['disk'].items()}, 'missing', list(r['missing']))" \
  || tail -3 "$OUT/next_project.log"
echo "== next done, $(left) s of the budget left"
