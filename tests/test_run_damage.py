"""A run directory after trouble: damaged checkpoint files give one SndError naming the file with a fix
that works (resuming reproduces the uninterrupted run), and a run that dies keeps every metrics row up to
its last checkpoint."""
from __future__ import annotations

import json
import re

import pytest
import torch

from snd.errors import SndError
from snd.train.checkpoint import latest_checkpoint
from snd.train.loop import train
from tests._cli import run_cli
from tests.test_train import _cfg, _factory


class _DiesAt(torch.utils.data.IterableDataset):
    """The stream of a process killed when it reaches item `at` (nothing after it runs)."""

    def __init__(self, inner, at: int):
        self.inner, self.at = inner, at

    def __iter__(self):
        for item in self.inner:
            if int(item["index"]) == self.at:
                raise RuntimeError("killed")
            yield item


def _dies_at(at: int):
    inner = _factory()
    return lambda start, rank, world_size: _DiesAt(inner(start, rank, world_size), at)


def _steps(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run and one stopped after its step-4 checkpoint (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("damage")
    full = train(_cfg(root / "full", ckpt_every=2), stream_factory=_factory(), progress=False)
    train(_cfg(root / "part", ckpt_every=2), stream_factory=_factory(), progress=False, stop_after=4)
    return root, full


def _copy(runs, tmp_path):
    import shutil

    root, _ = runs
    shutil.copytree(root / "part", tmp_path / "run")
    return tmp_path / "run"


def test_truncated_checkpoint_names_the_file_and_its_fix_resumes_exactly(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    ck = run / "checkpoints" / "step_0000004.safetensors"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    cfg = _cfg(run, ckpt_every=2)
    with pytest.raises(SndError, match="step_0000004.safetensors is unreadable") as e:
        train(cfg, stream_factory=_factory(), progress=False)
    # the export / eval / features loaders say the same on the command line: one message, exit 2
    assert run_cli(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.replace("\n", "")  # rich wraps long lines
    assert "step_0000004.safetensors is unreadable" in err and "Traceback" not in err and not (tmp_path / "x").exists()
    # the fix it prints: drop the damaged checkpoint, point latest.json at the previous one
    pointer = re.search(r'\{"step": \d+, "stem": "step_\d+"\}', str(e.value)).group(0)
    assert json.loads(pointer) == {"step": 2, "stem": "step_0000002"}
    ck.unlink()
    ck.with_suffix(".json").unlink()
    (run / "checkpoints" / "latest.json").write_text(pointer)
    resumed = train(cfg, stream_factory=_factory(), progress=False)
    full = runs[1]
    assert resumed.start_step == 2 and all(resumed.losses[s] == full.losses[s] for s in range(3, 7))


@pytest.mark.parametrize("name", ["latest.json", "step_0000004.json"])
def test_garbled_checkpoint_json_names_the_file(runs, tmp_path, name):
    run = _copy(runs, tmp_path)
    (run / "checkpoints" / name).write_text('{"step": ')
    with pytest.raises(SndError, match=re.escape(name) + " is unreadable") as e:
        train(_cfg(run, ckpt_every=2), stream_factory=_factory(), progress=False)
    # latest.json: the newest complete checkpoint is step 4; a damaged step 4: go back to step 2
    want = "step_0000004" if name == "latest.json" else "step_0000002"
    assert f'"stem": "{want}"' in str(e.value)


def test_a_killed_run_keeps_the_metrics_rows_of_its_last_checkpoint(tmp_path):
    """ckpt_every 3 with log_every 2: step 3 is saved before its row would be logged; a kill then lost it
    and the resumed run (starting after step 3) never wrote it."""
    cfg = _cfg(tmp_path / "r", log_every=2, ckpt_every=3)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, stream_factory=_dies_at(3), progress=False)  # dies fetching step 4's item
    assert latest_checkpoint(tmp_path / "r").name == "step_0000003.safetensors"
    assert _steps(tmp_path / "r") == [1, 2, 3]
    train(cfg, stream_factory=_factory(), progress=False)
    assert _steps(tmp_path / "r") == [1, 2, 3, 4, 5, 6]


def test_bad_weights_leave_no_run_folder(tmp_path):
    """A failed start (here: weights that do not fit) used to leave <run>/config.json behind."""
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "other.pth")
    with pytest.raises(SndError):
        train(_cfg(tmp_path / "r", init="pretrained", weights=tmp_path / "other.pth"), stream_factory=_factory(),
              progress=False)
    assert not (tmp_path / "r").exists()


def test_a_damaged_base_backbone_is_named_and_its_fix_resumes_exactly(runs, tmp_path):
    """backbone_base.safetensors cut short was reported with the advice for a user's --weights file."""
    from snd.train.checkpoint import BASE_FILE, load_backbone_from_run

    run = _copy(runs, tmp_path)
    base = run / BASE_FILE
    base.write_bytes(base.read_bytes()[:1000])
    with pytest.raises(SndError, match="the run's base backbone .* is damaged") as e:
        load_backbone_from_run(run)
    assert "pass a DINOv2 .pth" not in str(e.value)
    cfg = _cfg(run, ckpt_every=2)
    with pytest.raises(SndError, match="base backbone"):
        train(cfg, stream_factory=_factory(), progress=False)
    base.unlink()  # the fix it prints: the resumed run writes it again (same init)
    resumed = train(cfg, stream_factory=_factory(), progress=False)
    full = runs[1]
    assert resumed.start_step == 4 and all(resumed.losses[s] == full.losses[s] for s in (5, 6))
