"""The device-call scripts run their steps' real commands (checked on CPU with a recording `python3`).

Why: a device call is scarce (30 min a session); a script bug found there costs a call. One was:
`timeout` was handed the script's shell functions (`snd`, `py`), which it cannot run, so every step
failed in 0 s on the GPU.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _recording_python(tmp_path: Path) -> tuple[Path, Path]:
    """A `python3` on PATH that records (and skips) snd's and pytest's commands, and runs anything else."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(f"""#!/bin/sh
case "$1 $2" in
  "-m snd.cli"|"-m pytest"|"-m snd.bench.summary"|scripts/gpu_nan_hunt.py*|scripts/gpu_profile_operator.py*|scripts/gpu_profile_mvsplat.py*|scripts/gpu_precompute_ab.py*|scripts/loader_rates.py*|scripts/checkpoint_stall.py*) echo "$*${{SND_CORR_KERNEL:+ [SND_CORR_KERNEL=$SND_CORR_KERNEL]}}" >> "{log}"; exit 0;;
esac
exec "{sys.executable}" "$@"
""")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def _run_next(bin_dir: Path, out: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """scripts/gpu_next.sh with the recording `python3` first on PATH, $OUT = out and the given variables."""
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), **env_vars)
    env.pop("T_START", None)
    r = subprocess.run(["bash", "scripts/gpu_next.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _steps(out: Path) -> list[dict]:
    """The step records scripts/gpu_next.sh wrote ($OUT/next_steps.jsonl), in order."""
    return [json.loads(x) for x in (out / "next_steps.jsonl").read_text().splitlines()]


def test_gpu_next_runs_every_step_command_with_its_timeout(tmp_path):
    bin_dir, log = _recording_python(tmp_path)
    out = tmp_path / "out"
    _run_next(bin_dir, out, STEPS="distill eval", MODELS="vit_small_patch14_dinov2 vit_small_patch16_dinov3", BUDGET_S="545")
    calls = log.read_text().splitlines()
    assert any(c.startswith("-m snd.cli bench distill --models vit_small_patch16_dinov3 --paths fast") for c in calls), calls
    assert any(c.startswith("-m snd.cli bench eval --model dinov2_vits14") and "--protocol paper" in c for c in calls)
    assert any(c.startswith("-m pytest -q -m gpu tests/test_eval_probe_speed.py") for c in calls)
    steps = {s["step"]: s for s in _steps(out)}
    assert set(steps) == {"distill_vit_small_patch14_dinov2", "distill_vit_small_patch16_dinov3", "eval-tests", "bench-eval"}
    assert all(s["rc"] == 0 for s in steps.values()), steps  # rc 127 was the bug: `timeout snd ...`
    assert steps["distill_vit_small_patch14_dinov2"]["timeout_s"] == 150
    assert steps["distill_vit_small_patch16_dinov3"]["timeout_s"] == 260  # DINOv3's longer warm-up


def test_gpu_next_skips_a_step_the_budget_cannot_cover(tmp_path):
    bin_dir, log = _recording_python(tmp_path)
    out = tmp_path / "out"
    _run_next(bin_dir, out, STEPS="eval", BUDGET_S="150")
    steps = {s["step"]: s for s in _steps(out)}
    assert steps["eval-tests"]["rc"] == 0  # estimate 120 s fits in 150
    assert "budget" in steps["bench-eval"]["skipped"]  # estimate 200 s does not
    assert not any("bench eval" in c for c in log.read_text().splitlines())


def test_gpu_next_ckpt_times_both_snapshots_then_runs_the_writer_gpu_test(tmp_path):
    bin_dir, log = _recording_python(tmp_path)
    out = tmp_path / "out"
    _run_next(bin_dir, out, STEPS="ckpt", BUDGET_S="545")
    calls = log.read_text().splitlines()
    assert calls[:2] == ["scripts/checkpoint_stall.py --device cuda --rounds 3",
                         "-m pytest -q -m gpu tests/test_ckpt_writer.py tests/test_train.py tests/test_store_frames.py -p no:cacheprovider"], calls
    steps = _steps(out)
    assert [s["step"] for s in steps] == ["ckpt-stall", "ckpt-tests"] and all(s["rc"] == 0 for s in steps)
    _run_next(bin_dir, out, STEPS="add-ops", BUDGET_S="545")
    assert "-m snd.cli cache add-operators /tmp/snd-bench-pre/cache --out /tmp/snd-addops --device cuda" in log.read_text().splitlines()


def test_gpu_next_precompute_ab_times_both_operator_modes_then_profiles_the_store(tmp_path):
    bin_dir, log = _recording_python(tmp_path)
    out = tmp_path / "out"
    _run_next(bin_dir, out, STEPS="ops precompute-ab", BUDGET_S="545")
    calls = log.read_text().splitlines()
    pre = [c for c in calls if c.startswith("-m snd.cli bench precompute --source mvsplat")]
    assert [c.split(" --workdir")[0].split()[-1] for c in pre] == ["--operator-stream", "--no-operator-stream"], pre
    assert any(c.startswith("-m pytest -m gpu tests/test_contrib.py") and "tests/test_precompute.py" in c for c in calls)
    assert "scripts/gpu_profile_operator.py --store /tmp/snd-bench-pre/cache --tag mvsplat_random_init" in calls, calls
    steps = [s["step"] for s in _steps(out)]
    assert steps == ["ops-tests", "ops-profile", "precompute_operator-stream", "precompute_no-operator-stream",
                     "ops-profile-store"], steps


def test_gpu_next_precompute_corr_runs_mvsplat_tests_then_stage_one_with_and_without_the_kernel(tmp_path):
    bin_dir, log = _recording_python(tmp_path)
    out = tmp_path / "out"
    _run_next(bin_dir, out, STEPS="precompute-corr", BUDGET_S="545")
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m pytest -q -m gpu tests/test_mvsplat_corr_kernel.py tests/test_mvsplat_forward.py")
    pre = [c for c in calls if c.startswith("-m snd.cli bench precompute --source mvsplat")]
    assert [c.rsplit(" ", 1)[-1] for c in pre] == ["[SND_CORR_KERNEL=on]", "[SND_CORR_KERNEL=off]"], pre
    assert all("--images lossless --pairs 64" in c for c in pre) and "bench_precompute_mvsplat_corr_off.json" in pre[1]
    steps = [s["step"] for s in _steps(out)]
    assert steps == ["corr-tests", "precompute_corr_on", "precompute_corr_off"], steps
    _run_next(bin_dir, out, STEPS="mvsplat-profile", BUDGET_S="545")
    assert "scripts/gpu_profile_mvsplat.py --what corr compiled --corr-kernel on off" in log.read_text().splitlines()


def test_gpu_next_pipeline_ab_alternates_the_variants_over_one_source(tmp_path):
    bin_dir, log = _recording_python(tmp_path)
    out = tmp_path / "out"
    _run_next(bin_dir, out, STEPS="pipeline-ab", BUDGET_S="545")

    def ab_calls() -> list[str]:
        return [c for c in log.read_text().splitlines() if c.startswith("scripts/gpu_precompute_ab.py")]

    assert ab_calls() == ["scripts/gpu_precompute_ab.py --pairs 96 --rounds 2 --busy --variants thread workers1 inline chunk8 "
                          "no-operator"]
    _run_next(bin_dir, out, STEPS="pipeline-ab", BUDGET_S="545", AB_VARIANTS="thread inline", AB_PAIRS="8")
    assert ab_calls()[-1] == "scripts/gpu_precompute_ab.py --pairs 8 --rounds 2 --busy --variants thread inline"


def test_e2e_script_runs_the_readme_commands_in_order(tmp_path):
    """`scripts/e2e_commands.sh` (the real commands timed): each command reaches snd, the dataset is hidden
    while stage two runs, and e2e.json is written even when a step left no figures."""
    bin_dir, log = _recording_python(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), WORK=str(work), BUDGET_S="560")
    (work / "data").mkdir(parents=True)  # as if synthesised: the script hides it during distill and restores it
    r = subprocess.run(["bash", "scripts/e2e_commands.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    calls = [c.split()[2] for c in lines if c.startswith("-m snd.cli")]  # "-m snd.cli <command> ..."
    assert [c.split()[0] for c in lines if not c.startswith("-m")] == ["scripts/loader_rates.py"]  # NaN hunt: NAN_HUNT=1
    assert calls == ["precompute", "distill", "bench", "distill", "bench"], calls
    assert (work / "data").is_dir() and not (work / "data.hidden").exists()
    walls = [json.loads(x) for x in (work / "walls.jsonl").read_text().splitlines()]
    assert [w["name"] for w in walls] == ["precompute_depth", "distill", "bench_distill", "loader_rates", "nan_hunt",
                                          "distill_warm_cache", "bench_precompute"]
    assert all(w.get("rc", 0) == 0 for w in walls)
    assert "off" in walls[4]["skipped"]
    assert (out / "e2e_host.txt").read_text().split()[0].isdigit()  # the CPU count first
    assert "error" in json.loads((out / "e2e.json").read_text())  # the recorded commands left no metrics to read


def test_gpu_next_fast_tests_filter(tmp_path):
    """FAST_K narrows the fast-path GPU tests to a pytest -k subset (call 1 runs only the DINOv3 one)."""
    bin_dir, log = _recording_python(tmp_path)
    _run_next(bin_dir, tmp_path / "out", STEPS="fast-tests", FAST_K="dinov3", BUDGET_S="545")
    calls = [c for c in log.read_text().splitlines() if c.startswith("-m pytest")]
    assert calls == [c for c in calls if "tests/test_fast_path_gpu.py tests/test_packed.py -k dinov3" in c] and len(calls) == 1, calls


def test_gpu_next_eval_parts_run_alone(tmp_path):
    """STEPS=bench-eval times the suite without the evaluation GPU tests (and eval-tests runs only the tests)."""
    bin_dir, log = _recording_python(tmp_path)
    for steps, want in (("bench-eval", ["-m snd.cli bench eval"]), ("eval-tests", ["-m pytest"])):
        log.unlink(missing_ok=True)
        _run_next(bin_dir, tmp_path / steps, STEPS=steps, BUDGET_S="545")
        calls = [c for c in log.read_text().splitlines() if not c.startswith(("-m snd.cli bench project", "-m snd.bench.summary"))]
        assert [c[:len(want[0])] for c in calls] == want, calls


def test_gpu_next_ops_times_an_earlier_builder_against_this_one(tmp_path):
    """AB_BUILDER (a builder file): the ops step profiles it and this tree's builder, alternating, chunk 8."""
    bin_dir, log = _recording_python(tmp_path)
    before = tmp_path / "ab_before.py"
    before.write_text("# an earlier operator_build.py\n")
    _run_next(bin_dir, tmp_path / "out", STEPS="ops", BUDGET_S="545", AB_BUILDER=str(before))
    prof = [c for c in log.read_text().splitlines() if c.startswith("scripts/gpu_profile_operator.py")]
    ab = [c for c in prof if "--quick" in c]
    assert ab == [f"scripts/gpu_profile_operator.py --builder {before} --chunks 8 --quick --tag before",
                  "scripts/gpu_profile_operator.py --chunks 8 --quick --tag now"] * 2, prof


def test_gpu_next_kernels_time_every_config_on_synthetic_pairs_and_the_store(tmp_path):
    """STEPS="kernels kernels-store": the kernels' GPU tests, then one A/B process per input (synthetic pairs, then the
    stored MVSplat scaffold) timing the four slot/direct configs alternately, the direct rows checked."""
    bin_dir, log = _recording_python(tmp_path)
    out = tmp_path / "out"
    _run_next(bin_dir, out, STEPS="kernels kernels-store", BUDGET_S="545")
    calls = [c for c in log.read_text().splitlines() if "gpu_profile_operator" in c]
    assert [("--store" in c) for c in calls] == [False, True]
    assert all("--ab off/off on/off off/on on/on --rounds 2" in c and "--direct on" in c for c in calls), calls
    assert any(c.startswith("-m pytest -q -m gpu tests/test_contrib.py tests/test_operator_batched.py")
               for c in log.read_text().splitlines())
    steps = _steps(out)
    assert [s["step"] for s in steps] == ["kernels-tests", "kernels-ab", "kernels-store"]
    assert all(s["rc"] == 0 for s in steps), steps


def test_e2e_summary_of_run_7_names_the_window_after_the_checkpoint(tmp_path):
    """The e2e summary (the Python inside `summarise`) on run 7's recorded windows (H200, docs/bench): the last half
    at 0.968 of the bench, the window after the step-1000 checkpoint named, and 0.995 without it."""
    src = (REPO / "scripts" / "e2e_commands.sh").read_text()
    code = src.split("python3 - \"$WORK\" \"$OUT\" \"$ITERS\" <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "runs" / "vits").mkdir(parents=True)
    out.mkdir()
    windows = [json.loads(x) for x in (REPO / "docs" / "bench" / "e2e_distill_windows_h200_run7.jsonl").read_text().splitlines()]
    rows = [dict(w, step=w["step"] - 9 + k) for w in windows for k in range(10)]  # a row per step, its window's rate
    (work / "runs" / "vits" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "runs" / "vits" / "config.json").write_text(json.dumps({"ckpt_every": 1000, "log_every": 10}))
    (work / "walls.jsonl").write_text(json.dumps({"name": "distill", "rc": 0, "wall_s": 114.84}) + "\n")
    (out / "e2e_bench_distill.json").write_text((REPO / "docs" / "bench" / "e2e_bench_distill_h200_run7.json").read_text())
    (tmp_path / "summary.py").write_text(code)
    r = subprocess.run([sys.executable, str(tmp_path / "summary.py"), str(work), str(out), "2000"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "e2e.json").read_text())
    assert "error" not in res, res.get("error")
    assert abs(res["distill_vs_bench"] - 0.968) < 1e-3
    assert list(res["distill"]["windows_after_checkpoints"]) == ["1000"]
    assert abs(res["distill"]["windows_after_checkpoints"]["1000"] - 30.86) < 0.01
    assert abs(res["distill_vs_bench_without_checkpoint_windows"] - 0.995) < 1e-3
