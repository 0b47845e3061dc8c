"""Ctrl-C during `snd distill`: the step finishes, a checkpoint is saved there, the run stops (exit 130), and a
rerun resumes from that step exactly (not from the last periodic checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snd.pipeline.config import DistillConfig
from snd.splat.target import target_features
from snd.train.checkpoint import latest_checkpoint
from snd.train.loop import train
from snd.train.synthetic import SyntheticStream

pytestmark = pytest.mark.usefixtures("one_thread", "sigint_default")


@pytest.fixture
def sigint_default():
    """Python's own Ctrl-C handler for the test (and what forked workers inherit), whatever started pytest: a
    runner that starts it with SIGINT ignored (nohup, a background job) would otherwise pass SIG_IGN on."""
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, prev)


def _sigint_default_in_child() -> None:  # Popen preexec_fn: the CLI starts as from a terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)

IMG, SCAFFOLD = (56, 84), (14, 21)


def _cfg(run: Path) -> DistillConfig:
    return DistillConfig(run=run, model="snd_test_vit_patch14", init="random", img_height=IMG[0], img_width=IMG[1],
                         head_hidden=64, head_bottleneck=32, head_prototypes=256, lr=1e-3, iters=6, num_workers=0,
                         log_every=1, ckpt_every=100, device="cpu", renderer="torch", ema_every=2, seed=0)


def _stream(start, rank, world_size):
    return SyntheticStream(img_hw=IMG, scaffold_hw=SCAFFOLD, seed=0, rank=rank, world_size=world_size, start=start,
                           batch_size=1)


def test_ctrl_c_saves_at_the_step_and_the_rerun_continues_exactly(tmp_path):
    full = train(_cfg(tmp_path / "full"), stream_factory=_stream, progress=False)
    calls = []

    def target_then_ctrl_c(*a, **k):  # the signal arrives in the middle of step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return target_features(*a, **k)

    cfg = _cfg(tmp_path / "run")
    stopped = train(cfg, stream_factory=_stream, target_fn=target_then_ctrl_c, progress=False)
    assert stopped.interrupted and stopped.step == 3
    assert latest_checkpoint(cfg.run).name == "step_0000003.safetensors"  # ckpt_every is 100: saved for the interrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is gone after the run
    resumed = train(cfg, stream_factory=_stream, progress=False)
    assert resumed.start_step == 3 and resumed.step == 6 and not resumed.interrupted
    assert resumed.seen_indices == [3, 4, 5]
    assert [resumed.losses[s] for s in (4, 5, 6)] == [full.losses[s] for s in (4, 5, 6)]
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_0000006.safetensors"))
    b = load_file(str(cfg.run / "checkpoints" / "step_0000006.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_after_the_checkpoint_decision_still_saves(tmp_path, monkeypatch):
    """A Ctrl-C that lands after the step decided not to checkpoint (here: while step 3's logging window closes, where a
    terminal's signal met CI once) stops at the next step boundary, with the checkpoint, never without one."""
    from snd.train.windows import WindowLog

    close = WindowLog.close

    def close_then_ctrl_c(self, records, **k):
        close(self, records, **k)
        if records[-1].step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(WindowLog, "close", close_then_ctrl_c)
    cfg = _cfg(tmp_path / "run")
    stopped = train(cfg, stream_factory=_stream, progress=False)
    assert stopped.interrupted and stopped.step == 4
    assert latest_checkpoint(cfg.run).name == "step_0000004.safetensors"


def test_a_run_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """Under nohup (SIGINT ignored) the run does not install its handler: a SIGINT changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    calls = []

    def target_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return target_features(*a, **k)

    out = train(_cfg(tmp_path / "run"), stream_factory=_stream, target_fn=target_then_ctrl_c, progress=False)
    assert not out.interrupted and out.step == 6 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


class _Slow(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(40):
            time.sleep(0.02)
            yield torch.tensor(i)


@pytest.mark.parametrize("init, survives", [("ignore_sigint", True), (None, False)])
def test_loader_workers_outlive_a_ctrl_c_meant_for_the_main_process(init, survives):
    """Without `ignore_sigint` a worker dies of the terminal's Ctrl-C and the main process, waiting for its next
    batch, fails before it can save; with it, the batches keep coming."""
    from snd.train.interrupt import ignore_sigint

    loader = torch.utils.data.DataLoader(_Slow(), num_workers=2, worker_init_fn=ignore_sigint if init else None)
    it = iter(loader)
    next(it)  # the workers are up
    for w in it._workers:
        os.kill(w.pid, signal.SIGINT)
    if survives:
        assert len([next(it) for _ in range(30)]) == 30
    else:
        # how the failure surfaces depends on timing: DataLoader's "worker exited unexpectedly" (RuntimeError), or,
        # when a worker dies while the main process takes over a tensor it shared, the lost file descriptor (OSError)
        with pytest.raises((RuntimeError, StopIteration, OSError)):
            for _ in range(79):
                next(it)


def test_batch_iterator_loader_workers_ignore_ctrl_c():
    from snd.train.data import BatchIterator
    from snd.train.interrupt import ignore_sigint

    it = BatchIterator(_stream, batch=1, start=0, rank=0, world_size=1, num_workers=1, prefetch=2, pin_memory=False,
                       seed=0)
    loader_it = it._open()
    assert loader_it._worker_init_fn is ignore_sigint
    del loader_it


def test_terminal_ctrl_c_reaches_loader_workers_too_and_the_cli_exits_130(synth_root, tmp_path):
    """A terminal's Ctrl-C signals the whole process group, DataLoader workers included: they ignore it and the
    main process saves. `snd distill` in its own session (process group), signalled as a terminal would."""
    store, run = tmp_path / "cache", tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "snd.cli"]
    subprocess.run([*cli, "precompute", "--data", str(synth_root), "--out", str(store), "--height", "28", "--width",
                    "42", "--pairs-per-scene", "2", "--targets-per-pair", "1", "--device", "cpu", "--source", "depth",
                    "--images", "off"], check=True, env=env, capture_output=True)
    cmd = [*cli, "distill", "--shards", str(store), "--run", str(run), "--model", "snd_test_vit_patch14", "--init",
           "random", "--img-height", "28", "--img-width", "42", "--head-hidden", "32", "--head-bottleneck", "16",
           "--head-prototypes", "64", "--iters", "100000", "--num-workers", "2", "--log-every", "1", "--ckpt-every",
           "100000", "--device", "cpu", "--renderer", "torch"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=_sigint_default_in_child)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # to the group: main process and loader workers
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    ckpt = latest_checkpoint(run)
    step = json.loads(ckpt.with_suffix(".json").read_text())["step"]
    assert 3 <= step < 100000 and "interrupted" in err and "Rerun the same command" in err
    assert "Traceback" not in err
