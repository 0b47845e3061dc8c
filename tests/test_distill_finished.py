"""A finished `snd distill` run says so; a larger --iters continues it with the schedule re-laid (issue #22)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from snd.pipeline.config import DistillConfig
from snd.train.checkpoint import latest_checkpoint
from snd.train.loop import TrainSummary, train
from snd.train.synthetic import SyntheticStream

IMG = (56, 84)


def _cfg(run: Path, **kw) -> DistillConfig:
    base = dict(run=run, model="snd_test_vit_patch14", init="random", img_height=IMG[0], img_width=IMG[1],
                head_hidden=64, head_bottleneck=32, head_prototypes=256, lr=1e-3, iters=4, num_workers=0,
                log_every=1, ckpt_every=100, device="cpu", renderer="torch", ema_every=2, seed=0, warmup_pct=0.3)
    base.update(kw)
    return DistillConfig(**base)


def _flat(text: str) -> str:
    """Text without whitespace (rich wraps long lines, dropping the space at the break)."""
    return "".join(text.split())


def _factory(start, rank, world_size):
    return SyntheticStream(img_hw=IMG, scaffold_hw=(14, 21), seed=0, rank=rank, world_size=world_size, start=start,
                           batch_size=1)


def _one_cycle_lrs(cfg: DistillConfig, n: int) -> list[float]:
    """The rate each of the first n steps uses under a one-cycle schedule built for cfg.iters (torch's own)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iters + 10, pct_start=cfg.warmup_pct,
                                                anneal_strategy="cos", cycle_momentum=False)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_finished_run_is_reported_complete_with_its_checkpoint(tmp_path, capsys):
    from snd.stages.distill import run

    cfg = _cfg(tmp_path / "run")
    first = train(cfg, stream_factory=_factory, progress=False)
    assert first.step == 4 and not first.complete
    again = train(cfg, stream_factory=_factory, progress=False)
    ck = latest_checkpoint(cfg.run)
    assert again.complete and again.step == again.start_step == 4 and again.checkpoint == ck and not again.losses
    shorter = train(_cfg(cfg.run, iters=2), stream_factory=_factory, progress=False)  # a smaller --iters: still done
    assert shorter.complete and shorter.step == 4
    # the CLI's message (a finished run returns before any data is read, so any existing --shards folder does)
    run(_cfg(cfg.run, shards=tmp_path))
    err = _flat(capsys.readouterr().err)
    assert _flat("is complete at step 4") in err and ck.name in err and "nan" not in err and "None" not in err


def test_larger_iters_continues_a_finished_run_on_the_new_schedule(tmp_path, capsys, monkeypatch):
    import snd.stages.distill as D

    cfg = _cfg(tmp_path / "run")
    train(cfg, stream_factory=_factory, progress=False)
    longer = _cfg(cfg.run, iters=8)
    # the CLI says so before training (train itself is not needed to check the message)
    monkeypatch.setattr(D, "train", lambda c: TrainSummary(run=c.run, start_step=4, step=8))
    D.run(_cfg(cfg.run, iters=8, shards=tmp_path))
    err = _flat(capsys.readouterr().err)
    assert all(_flat(x) in err for x in ("continuing run", "from step 4 to 8 (it was set for 4 steps", "re-laid over 8"))
    monkeypatch.undo()
    cont = train(longer, stream_factory=_factory, progress=False)
    assert not cont.complete and cont.continued_from == 4 and (cont.start_step, cont.step) == (4, 8)
    assert cont.seen_indices == [4, 5, 6, 7], "the continued run reads the stream where the finished one stopped"
    assert latest_checkpoint(cfg.run).name == "step_0000008.safetensors"
    want = _one_cycle_lrs(longer, 8)[4:]  # steps 5..8 under a schedule laid over 8 steps
    got = [cont.lrs[s] for s in range(5, 9)]
    assert got == pytest.approx(want, rel=1e-9)
    assert got != pytest.approx(_one_cycle_lrs(cfg, 8)[4:], rel=1e-3)  # not the old schedule's tail
    assert train(longer, stream_factory=_factory, progress=False).complete  # and now it is complete at 8


def test_skipped_steps_are_a_warning_not_only_a_count(tmp_path, capsys, monkeypatch):
    """A run whose loss or gradient went non-finite says how many steps it skipped, as a warning line."""
    import snd.stages.distill as D

    monkeypatch.setattr(D, "train", lambda c: TrainSummary(run=c.run, start_step=0, step=40, skipped=3))
    D.run(_cfg(tmp_path / "run", iters=40, shards=tmp_path))
    err = _flat(capsys.readouterr().err)
    assert _flat("warning: 3 of 40 steps had a non-finite loss or gradient and were skipped") in err
    monkeypatch.setattr(D, "train", lambda c: TrainSummary(run=c.run, start_step=0, step=40))
    D.run(_cfg(tmp_path / "run", iters=40, shards=tmp_path))
    assert "warning" not in capsys.readouterr().err
