"""Checkpoints written on a background thread (`CheckpointWriter`): the file holds the tensors as they were
at submit time, a write error reaches the training thread, and a run writes the same checkpoints either way."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from snd.train.checkpoint import CheckpointWriter, latest_checkpoint
from snd.train.loop import train
from tests.test_train import _cfg, _factory


def test_background_write_keeps_the_tensors_of_submit_time(tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    want = {k: v.clone() for k, v in t.items()}
    w = CheckpointWriter()
    path = w.submit(tmp_path, step=5, tensors=t, meta={"x": 1})
    t["a"].add_(100.0)  # the next training steps change the parameters in place (no copy on CPU otherwise)
    t["b"].zero_()
    assert w.wait() == path == latest_checkpoint(tmp_path)
    got = load_file(str(path))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads(path.with_suffix(".json").read_text()) == {"step": 5, "x": 1}


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    w = CheckpointWriter()
    w.submit(tmp_path, step=1, tensors={"a": torch.zeros(2)}, meta={})
    with pytest.raises(OSError):
        w.wait()
    assert w.wait() == tmp_path / "checkpoints" / "step_0000001.safetensors"  # raised once, then clear


def test_run_checkpoints_are_the_same_written_in_the_background_or_not(tmp_path):
    runs = {}
    for bg in (True, False):
        s = train(_cfg(tmp_path / str(bg), ckpt_every=2, ckpt_background=bg), stream_factory=_factory(), progress=False)
        runs[bg] = (s, load_file(str(tmp_path / str(bg) / "checkpoints" / "step_0000006.safetensors")))
    (sa, a), (sb, b) = runs[True], runs[False]
    assert sa.checkpoint == latest_checkpoint(tmp_path / "True") and sa.checkpoint.is_file()
    assert sa.losses == sb.losses
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumes_with_the_other_writer(tmp_path):
    """--ckpt-background does not change the math, so a run may resume with it switched."""
    full = train(_cfg(tmp_path / "a", ckpt_every=2), stream_factory=_factory(), progress=False)
    train(_cfg(tmp_path / "b", ckpt_every=2), stream_factory=_factory(), progress=False, stop_after=3)
    resumed = train(_cfg(tmp_path / "b", ckpt_every=2, ckpt_background=False), stream_factory=_factory(), progress=False)
    assert resumed.start_step == 2 and all(resumed.losses[s] == full.losses[s] for s in range(3, 7))


@pytest.mark.parametrize("snapshot", ["device", "host"])
def test_buffers_reused_across_checkpoints_hold_each_submits_values(tmp_path, snapshot):
    """The device snapshot's buffers live from one checkpoint to the next: the second file must hold the second
    submit's values (not the first's), and a tensor whose shape changed gets a new buffer."""
    w = CheckpointWriter(snapshot=snapshot)
    t = {"a": torch.arange(6.0), "b": torch.full((3,), 7, dtype=torch.int64)}
    p1 = w.submit(tmp_path, step=1, tensors=t, meta={})
    first = {k: v.clone() for k, v in t.items()}
    t["a"].mul_(-2.0)
    t["b"] = torch.arange(5)  # a new shape
    p2 = w.submit(tmp_path, step=2, tensors=t, meta={})
    want2 = {k: v.clone() for k, v in t.items()}
    t["a"].zero_()
    w.wait()
    one, two = load_file(str(p1)), load_file(str(p2))
    assert all(torch.equal(one[k], first[k]) for k in first)
    assert all(torch.equal(two[k], want2[k]) for k in want2)


def test_no_device_memory_for_the_snapshot_falls_back_to_the_host_copy(tmp_path, monkeypatch):
    w = CheckpointWriter()

    def oom(*a, **k):
        raise torch.OutOfMemoryError("no room for the snapshot")

    monkeypatch.setattr(CheckpointWriter, "_buffer", staticmethod(oom))
    t = {"a": torch.arange(4.0)}
    with pytest.warns(UserWarning, match="no device memory for the snapshot"):
        path = w.submit(tmp_path, step=3, tensors=t, meta={})
    t["a"].add_(1.0)
    w.wait()
    assert w.snapshot == "host" and torch.equal(load_file(str(path))["a"], torch.arange(4.0))


@pytest.mark.gpu
def test_cuda_snapshot_is_the_submit_time_state_while_the_stream_keeps_changing_it(tmp_path):
    """On a GPU the snapshot is a device copy queued behind the step and the host copy runs on the writer's own
    stream: work queued on the training stream right after `submit` (in-place updates, as the next steps'
    optimizer does) must not leak into the file, and the file must not miss work queued before it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    t = {f"w{i}": torch.randn(4_000_000, device=dev, generator=g) for i in range(8)}  # 128 MB
    ref = {k: v.clone() for k, v in t.items()}  # the same updates, applied to a copy, give the expected values

    def queued_updates(tensors):  # ~a second of GPU work ending in in-place changes of every tensor
        big = torch.ones(4096, 4096, device=dev) / 4096
        for _ in range(200):
            big = big @ big
        for v in tensors.values():
            v.add_(big[0, 0] * 3.0)

    torch.cuda.synchronize()
    queued_updates(t)  # not synchronised: still queued when submit takes the snapshot
    w = CheckpointWriter()
    path = w.submit(tmp_path, step=1, tensors=t, meta={})
    for _ in range(50):  # the next steps change every tensor in place, on the training stream
        for v in t.values():
            v.mul_(1.5).add_(1.0)
    w.wait()
    queued_updates(ref)
    want = {k: v.cpu() for k, v in ref.items()}
    got = load_file(str(path))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(want["w0"], t["w0"].cpu())  # (the later updates did change the tensors)
    assert all(b.is_pinned() for b in w._pinned.values()) and w._snap["w0"].is_cuda
