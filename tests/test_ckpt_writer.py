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
