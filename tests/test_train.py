"""The distillation loop on CPU: learning, exact resume, EMA cadence, NaN guard, checkpoints, 2-process gloo."""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snd.errors import SndError
from snd.models.backbone import create_backbone, extract, normalize
from snd.models.lora import apply_lora, lora_layers
from snd.pipeline.config import DistillConfig
from snd.train.checkpoint import BASE_FILE, latest_checkpoint, load_backbone_from_run
from snd.train.distiller import lora_spec
from snd.train.loop import train
from snd.train.synthetic import PoisonedStream, SyntheticStream

IMG = (56, 84)  # 4 x 6 patches
SCAFFOLD = (14, 21)


def _cfg(run: Path, **kw) -> DistillConfig:
    base = dict(run=run, model="snd_test_vit_patch14", init="random", img_height=IMG[0], img_width=IMG[1],
                head_hidden=64, head_bottleneck=32, head_prototypes=512, lr=1e-3, iters=6, num_workers=0,
                log_every=1, ckpt_every=100, device="cpu", renderer="torch", ema_every=2, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def _factory(distinct=None, nan_at=None):
    def make(start, rank, world_size):
        s = SyntheticStream(img_hw=IMG, scaffold_hw=SCAFFOLD, seed=0, rank=rank, world_size=world_size, start=start,
                            batch_size=1, distinct=distinct)
        if nan_at is None:
            return s
        return PoisonedStream(s, nan_at)
    return make


def test_short_run_lowers_loss(tmp_path):
    cfg = _cfg(tmp_path / "run", iters=20, student_temp=0.1, teacher_temp=0.04, lora_dropout=0.0, log_every=5)
    s = train(cfg, stream_factory=_factory(distinct=2), progress=False)
    losses = [s.losses[i] for i in range(1, 21)]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert all(math.isfinite(v) for v in losses)
    assert last < first - 0.3, f"loss did not go down: first {first:.3f}, last {last:.3f}"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    lrs = [r["lr"] for r in rows]
    peak = lrs.index(max(lrs))
    assert max(lrs) > 0.9 * cfg.lr  # (20 steps: the 1 % warm-up ends before step 1) ...
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 0.5 * cfg.lr  # ... cosine decay
    assert (tmp_path / "run" / "tb").is_dir() and (tmp_path / "run" / "config.json").is_file()


def test_rigid_inverse():
    from snd.splat.gaussians import quat_to_rotmat
    from snd.train.distiller import rigid_inverse

    c2w = torch.eye(4)
    c2w[:3, :3] = quat_to_rotmat(torch.tensor([0.9, 0.2, -0.3, 0.1]))
    c2w[:3, 3] = torch.tensor([1.0, -2.0, 0.5])
    assert torch.allclose(rigid_inverse(c2w) @ c2w, torch.eye(4), atol=1e-6)
    assert torch.allclose(rigid_inverse(c2w), torch.linalg.inv(c2w), atol=1e-6)


def test_one_cycle_schedule():
    from snd.train.schedule import make_optimizer, make_scheduler

    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([p], lr=2e-5)
    sched = make_scheduler(opt, lr=2e-5, iters=1000, warmup_pct=0.01)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: a no-op, keeps the optimizer-before-scheduler order
        sched.step()
    assert abs(lrs[0] - 2e-5 / 25) < 1e-12  # OneCycleLR starts at max_lr / div_factor
    peak = max(range(1000), key=lambda i: lrs[i])
    assert 8 <= peak <= 11 and abs(lrs[peak] - 2e-5) < 1e-9  # 1 % of (1000 + 10) steps
    assert all(a > b for a, b in zip(lrs[peak + 1:], lrs[peak + 2:])) and lrs[-1] < 2e-5 * 1e-3


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(_cfg(tmp_path / "a", ckpt_every=2), stream_factory=_factory(), progress=False)
    cfg_b = _cfg(tmp_path / "b", ckpt_every=2)
    killed = train(cfg_b, stream_factory=_factory(), progress=False, stop_after=3)  # checkpoint at 2, dies after 3
    assert killed.step == 3 and latest_checkpoint(tmp_path / "b").name == "step_0000002.safetensors"
    resumed = train(cfg_b, stream_factory=_factory(), progress=False)
    assert resumed.start_step == 2 and resumed.step == 6
    assert resumed.seen_indices == [2, 3, 4, 5], "resumed run must see the uninterrupted run's next items"
    for step in range(3, 7):
        assert resumed.losses[step] == full.losses[step], f"step {step}: {resumed.losses[step]} vs {full.losses[step]}"
    assert killed.losses[3] == full.losses[3]
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_0000006.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_0000006.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.ema_updates == 3 and resumed.ema_updates == 3  # every 2 steps over 6 steps


def test_resume_refuses_other_settings(tmp_path):
    train(_cfg(tmp_path / "r", iters=2), stream_factory=_factory(), progress=False)
    with pytest.raises(SndError, match="lora_rank"):
        train(_cfg(tmp_path / "r", iters=2, lora_rank=4), stream_factory=_factory(), progress=False)


def test_ema_cadence_and_frozen_teacher(tmp_path):
    s = train(_cfg(tmp_path / "e", iters=7, ema_every=3), stream_factory=_factory(), progress=False)
    assert s.ema_updates == 2
    t = load_file(str(latest_checkpoint(tmp_path / "e")))
    moved = [k for k in t if k.startswith("teacher.") and "lora_B" in k]
    assert moved and any(t[k].abs().sum() > 0 for k in moved), "EMA must move the teacher's LoRA B away from 0"
    f = train(_cfg(tmp_path / "f", iters=7, ema_every=3, frozen_teacher=True), stream_factory=_factory(), progress=False)
    assert f.ema_updates == 0
    t = load_file(str(latest_checkpoint(tmp_path / "f")))
    assert all(t[k].abs().sum() == 0 for k in t if k.startswith("teacher.") and "lora_B" in k)


def test_nan_guard_skips_the_step(tmp_path):
    # the poisoned item (stream position 1) is step 2, inside the first logging window of 3 steps
    s = train(_cfg(tmp_path / "n", iters=4, ema_every=100, log_every=3), stream_factory=_factory(nan_at=1),
              progress=False)
    assert s.skipped == 1 and math.isnan(s.losses[2]) and all(math.isfinite(s.losses[i]) for i in (1, 3, 4))
    rows = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0), (2, 1), (3, 0), (4, 0)]
    skipped = [json.loads(x) for x in (tmp_path / "n" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rank"], r["positions"]) for r in skipped] == [(2, 0, [1])]
    t = load_file(str(latest_checkpoint(tmp_path / "n")))
    assert all(torch.isfinite(v).all() for v in t.values())
    steps = {float(v) for k, v in t.items() if k.endswith(".step")}
    assert steps == {3.0}, f"Adam must have taken 3 of 4 steps, got {steps}"


@pytest.mark.parametrize("ablation", [dict(loss="cosine"), dict(feature_render_loss=True), dict(render_to_context=True),
                                      dict(upsample="bilinear", blend=False)])
def test_ablations_run(tmp_path, ablation):
    s = train(_cfg(tmp_path / "x", iters=1, **ablation), stream_factory=_factory(), progress=False)
    assert all(math.isfinite(v) for v in s.losses.values())
    t = load_file(str(latest_checkpoint(tmp_path / "x")))
    has_head = any(k.startswith("student_head.") for k in t)
    assert has_head == (ablation.get("loss", "dino") == "dino" and not ablation.get("feature_render_loss", False))
    if ablation.get("feature_render_loss"):
        assert s.ema_updates == 0


def test_load_backbone_from_run(tmp_path):
    cfg = _cfg(tmp_path / "m", iters=3)
    train(cfg, stream_factory=_factory(), progress=False)
    plain = load_backbone_from_run(tmp_path / "m")
    assert not lora_layers(plain) and not any(p.requires_grad for p in plain.parameters())
    # independent path: base weights + peft LoRA with the checkpoint's adapters, wrapped forward in eval
    ref = create_backbone(cfg.model, init="random")
    ref.load_state_dict(load_file(str(tmp_path / "m" / BASE_FILE)))
    ref = apply_lora(ref, lora_spec(cfg)).eval()
    t = load_file(str(latest_checkpoint(tmp_path / "m")))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".lora_" in n:
                p.copy_(t["student." + n])
    x = normalize(plain, torch.rand(2, 3, *IMG))
    assert torch.allclose(extract(plain, x)[1], extract(ref, x)[1], atol=1e-5)
    base = create_backbone(cfg.model, init="random")
    base.load_state_dict(load_file(str(tmp_path / "m" / BASE_FILE)))
    assert not torch.allclose(extract(plain, x)[1], extract(base.eval(), x)[1], atol=1e-4), "training changed nothing"
    teacher = load_backbone_from_run(latest_checkpoint(tmp_path / "m"), which="teacher")
    assert extract(teacher, x)[1].shape == (2, 64, 4, 6)
    with pytest.raises(SndError, match="not an snd run"):
        load_backbone_from_run(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo(tmp_path):
    import torch.multiprocessing as mp

    from snd.train.synthetic import spawn_worker

    cfg = _cfg(tmp_path / "ddp", iters=3, ema_every=2, ckpt_every=3)
    # item 3 (rank 1's second) is poisoned: both ranks skip step 2, and rank 0 records rank 1's item
    mp.spawn(spawn_worker, args=(2, cfg, _free_port(), str(tmp_path), None, None, 3), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["seen"] == [0, 2, 4] and r1["seen"] == [1, 3, 5], (r0["seen"], r1["seen"])
    assert r0["digest"] == r1["digest"], "parameters must stay identical across ranks"
    assert json.dumps(r0["losses"]) == json.dumps(r1["losses"])  # rank-averaged (step 2's is NaN on both)
    assert r0["skipped"] == r1["skipped"] == 1 and math.isnan(r0["losses"]["2"])
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "skipped.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["rank"], r["positions"]) for r in rows) == [(2, 0, [2]), (2, 1, [3])]
    assert latest_checkpoint(tmp_path / "ddp") is not None
    meta = json.loads(latest_checkpoint(tmp_path / "ddp").with_suffix(".json").read_text())
    assert meta["data_position"] == 3 and len(meta["rng"]) == 2  # items per rank


def test_two_process_fast_path_equals_one_process_with_twice_the_batch(tmp_path):
    """Data parallelism is exact: 2 ranks x batch 1 on the fast path (stored operators; the captured body
    replayed eagerly on CPU, with the one all-reduce between its two halves) take the same steps as one
    process with batch 2 over the same items (rank r sees items r, r + 2, ...; the single process sees
    (0, 1), (2, 3), ...), up to float rounding."""
    import torch.multiprocessing as mp

    from snd.train.synthetic import spawn_worker

    grid = (IMG[0] // 14, IMG[1] // 14)
    kw = dict(iters=4, ema_every=2, lora_dropout=0.0, targets="operator", log_every=2)
    mp.spawn(spawn_worker, args=(2, _cfg(tmp_path / "ddp", fast="on", **kw), _free_port(), str(tmp_path), None, grid),
             nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["seen"] == [0, 2, 4, 6] and r1["seen"] == [1, 3, 5, 7]
    assert r0["digest"] == r1["digest"] and r0["losses"] == r1["losses"]

    def make(start, rank, world_size):
        return SyntheticStream(img_hw=IMG, scaffold_hw=SCAFFOLD, seed=0, rank=rank, world_size=world_size, start=start,
                               batch_size=2, operator_grid=grid)

    one = train(_cfg(tmp_path / "one", batch=2, fast="on", **kw), stream_factory=make, progress=False)
    assert one.seen_indices == list(range(8))
    ddp = [r0["losses"][str(s)] for s in range(1, 5)]
    assert ddp == pytest.approx([one.losses[s] for s in range(1, 5)], rel=1e-5)
    assert r0["digest"] == pytest.approx(one.param_digest, rel=1e-6)
    assert one.skipped == 0 and r0["skipped"] == 0 and one.ema_updates == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_steps(tmp_path):
    cfg = _cfg(tmp_path / "g", iters=7, device="cuda", renderer="auto", amp="auto", ckpt_every=7, log_every=2)
    s = train(cfg, stream_factory=_factory(), progress=False)
    assert s.step == 7 and s.skipped == 0 and all(math.isfinite(v) for v in s.losses.values())
    assert load_backbone_from_run(tmp_path / "g") is not None
    # windows read back asynchronously (pinned copies, timing events): every row, the summary's losses, a rate each
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8)) and [r["loss"] for r in rows] == [s.losses[i] for i in range(1, 8)]
    assert all(0 < r["it_per_s"] < 1e6 for r in rows)


def test_compiler_failure_falls_back_to_eager_once(caplog):
    """A torch.compile compiler crash (not an error of the function) switches to eager with one warning;
    an error raised by the function itself still propagates."""
    from torch._inductor.exc import InductorError

    from snd.train.step import EagerOnCompilerError

    calls = []

    def broken_compiled(x):
        calls.append("compiled")
        raise InductorError(RuntimeError("PassManager::run failed"), None)

    def eager(x):
        calls.append("eager")
        if x < 0:
            raise ValueError("bad input")
        return x * 2

    f = EagerOnCompilerError(broken_compiled, eager, "student")
    with caplog.at_level("WARNING", logger="snd.train.step"):
        assert f(3) == 6 and f(4) == 8
    assert calls == ["compiled", "eager", "eager"] and f.fell_back
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1
    g = EagerOnCompilerError(lambda x: eager(x), eager, "teacher")  # the function's own error is not swallowed
    with pytest.raises(ValueError, match="bad input"):
        g(-1)
    assert not g.fell_back


class _SlowStream(torch.utils.data.IterableDataset):
    """Each item `delay` seconds late: a loader slower than the step."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __iter__(self):
        import time

        for item in self.inner:
            time.sleep(self.delay)
            yield item


def test_the_time_blocked_on_the_loader_is_measured_and_named(tmp_path):
    """With items 0.15 s late and no workers, the loop blocks >= 0.15 s per step on data: metrics.jsonl carries it
    per logging window, the summary after the first step, and `snd distill`'s note calls the run loader-bound
    (it stays silent for a run that did not wait, or one too short to judge)."""
    from dataclasses import replace

    from snd.stages.distill import loader_bound_note

    def make(start, rank, world_size):
        return _SlowStream(_factory(distinct=2)(start, rank, world_size), 0.15)

    s = train(_cfg(tmp_path / "slow", iters=5, log_every=1), stream_factory=make, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_wait_ms"] >= 140 for r in rows), [r["data_wait_ms"] for r in rows]
    assert s.timed_steps == 4 and s.data_wait_s >= 4 * 0.14 and s.timed_s >= s.data_wait_s and s.num_workers == 0
    assert loader_bound_note(s) is None  # 4 steps: too few to judge
    note = loader_bound_note(s, min_steps=4)
    assert note is not None and "loader bounded this run" in note and "--images jpeg" in note
    assert loader_bound_note(replace(s, data_wait_s=0.1 * s.timed_s), min_steps=4) is None  # waited 10 %


def test_windows_are_written_one_late_and_all_before_a_checkpoint(tmp_path, monkeypatch):
    """Logging windows are read back without a host sync: a window's rows reach metrics.jsonl when the next window
    closes, but every row up to a checkpoint is written before that checkpoint (a resume never logs them again),
    and all rows by the end, with the summary's losses."""
    from snd.train.checkpoint import CheckpointWriter
    from snd.train.windows import WindowLog

    metrics = tmp_path / "run" / "metrics.jsonl"
    written = lambda: [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.is_file() else []  # noqa: E731
    at_close, at_ckpt = {}, {}
    close, submit = WindowLog.close, CheckpointWriter.submit

    def close_recording(self, records, **k):
        at_close[records[-1].step] = written()
        close(self, records, **k)

    def submit_recording(self, run_dir, *, step, **k):
        at_ckpt[step] = written()
        return submit(self, run_dir, step=step, **k)

    monkeypatch.setattr(WindowLog, "close", close_recording)
    monkeypatch.setattr(CheckpointWriter, "submit", submit_recording)
    s = train(_cfg(tmp_path / "run", iters=9, log_every=2, ckpt_every=5), stream_factory=_factory(), progress=False)
    # windows end at 2, 4, 5 (checkpoint), 6, 8, 9 (end); when one closes, the windows before it but the newest are written
    assert at_close == {2: [], 4: [], 5: [1, 2], 6: [1, 2, 3, 4, 5], 8: [1, 2, 3, 4, 5], 9: [1, 2, 3, 4, 5, 6]}
    assert at_ckpt == {5: [1, 2, 3, 4, 5], 9: list(range(1, 10))}
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["loss"] for r in rows] == [s.losses[i] for i in range(1, 10)] and all(r["it_per_s"] > 0 for r in rows)
