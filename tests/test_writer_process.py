"""`--writer process`: stage one's shard writer in a child process writes the same store as the thread, a
kill -9 of the parent leaves nothing behind that a rerun does not redo (the child exits by itself), and a
child that dies fails its open scenes with a message instead of hanging the run."""
from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from snd.cache import manifest as M
from snd.cache.reader import CacheReader
from snd.cache.schema import Encoding
from snd.errors import SndError
from snd.stages.precompute import run
from snd.stages.precompute.settings import resolve_writer, resolve_writer_codecs
from tests._stage_one import kill_mid_second_scene, make_cfg, store_files


@pytest.fixture(scope="module")
def thread_store(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("thread") / "cache"
    s = run(make_cfg(synth_root, out, writer="thread"), progress=False)
    assert (s.scenes_done, s.failed, s.writer, s.writer_codecs) == (2, 0, "thread", "zarr")
    return out


def test_the_process_writer_writes_the_thread_writers_store(thread_store, synth_root, tmp_path):
    out = tmp_path / "process"
    s = run(make_cfg(synth_root, out, writer="process"), progress=False)
    assert (s.scenes_done, s.failed, s.pairs, s.writer) == (2, 0, 8, "process")
    names = CacheReader(thread_store).scenes
    assert CacheReader(out).scenes == names and CacheReader(out).verify_all() == 8
    for n in names:
        assert store_files(out, n) == store_files(thread_store, n), n
    assert M.read_manifest(out)["scenes"] == M.read_manifest(thread_store)["scenes"]
    # the callbacks ran in this process: the summary counts what the child wrote
    assert s.bytes == sum(r["bytes"] for r in M.read_manifest(out)["scenes"].values()) and s.bytes > 0
    assert not mp.active_children()  # the child was joined


def test_zarrs_codecs_store_the_same_values_and_checksums(thread_store, synth_root, tmp_path):
    """`--writer-codecs zarrs` (zarrs-python's Rust codec pipeline) in the writer process: the store reads back to the
    same values as zarr's own pipeline wrote, with the same checksum tables (of the stored, uncompressed bytes)."""
    pytest.importorskip("zarrs")
    out = tmp_path / "zarrs"
    s = run(make_cfg(synth_root, out, writer="process", writer_codecs="zarrs"), progress=False)
    assert (s.scenes_done, s.failed, s.writer_codecs) == (2, 0, "zarrs")
    a, b = CacheReader(thread_store), CacheReader(out)
    assert b.verify_all() == 8 and a.scenes == b.scenes
    keys = ("checksums_sha256", "op_checksums_sha256", "frames_checksums_sha256", "pairs", "frames", "frame_bytes")
    for n in a.scenes:
        ra, rb = M.read_manifest(thread_store)["scenes"][n], M.read_manifest(out)["scenes"][n]
        assert {k: ra.get(k) for k in keys} == {k: rb.get(k) for k in keys} and ra["checksums_sha256"]
        sa, sb = a.scene(n), b.scene(n)
        for p in range(sa.n_pairs):
            xa, xb = sa.read_stored(p), sb.read_stored(p)
            assert xa.keys() == xb.keys()
            for k in xa:
                np.testing.assert_array_equal(xa[k], xb[k], err_msg=f"{n} pair {p} {k}")


def test_writer_auto_and_bad_values():
    assert resolve_writer("auto", "cpu") == "thread" and resolve_writer("auto", "cuda") == "process"
    assert resolve_writer("process", "cpu") == "process"
    with pytest.raises(SndError, match="--writer must be"):
        resolve_writer("fork", "cpu")
    with pytest.raises(SndError, match="--writer-codecs must be"):
        resolve_writer_codecs("blosc")
    assert resolve_writer_codecs("zarr") == "zarr"
    if importlib.util.find_spec("zarrs") is None:
        with pytest.raises(SndError, match="pip install zarrs"):
            resolve_writer_codecs("zarrs")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: nothing may reap orphans in a container)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state or "\nState:\tX" in state


def test_kill_9_of_the_parent_then_resume_gives_the_same_store(thread_store, synth_root, tmp_path):
    out = tmp_path / "killed"
    proc, pids, spills = kill_mid_second_scene(synth_root, out, writer="process")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(pids) == 1
    t = time.monotonic()
    while not _gone(pids[0]) and time.monotonic() - t < 30:  # the child sees the pipe close and exits
        time.sleep(0.1)
    assert _gone(pids[0])
    if Path("/dev/shm").is_dir():
        assert spills and not any(p.exists() for p in spills)  # the child removed its spill folder (RAM) too
    assert len(CacheReader(out).scenes) <= 1  # the scene in flight is not complete
    s = run(make_cfg(synth_root, out, writer="process"), progress=False)
    assert s.failed == 0 and s.scenes_done + s.scenes_skipped == 2
    for n in CacheReader(thread_store).scenes:
        assert store_files(out, n) == store_files(thread_store, n), n
    assert not list(M.tmp_dir(out).iterdir())


def test_a_dead_writer_process_fails_its_scenes_without_hanging(synth_root, tmp_path):
    out = tmp_path / "dead"
    killed = []

    def on_batch(scene: str, n: int) -> None:
        if not killed:  # the first batch: the child dies before the scene's commit
            killed.extend(p.pid for p in mp.active_children())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    s = run(make_cfg(synth_root, out, writer="process"), progress=False, on_batch=on_batch)
    assert len(killed) == 1
    assert s.scenes_done == 0 and s.failed == 2, s
    assert all("writer process died" in m and "rerun" in m for m in s.failures.values()), s.failures
    man = M.read_manifest(out)
    assert {r["status"] for r in man["scenes"].values()} == {"failed"}
    assert not CacheReader(out).scenes
    # a rerun redoes both
    s2 = run(make_cfg(synth_root, out, writer="process"), progress=False)
    assert (s2.scenes_done, s2.failed) == (2, 0)


def test_a_batch_crosses_to_the_writer_process_through_a_spill_file_unchanged(tmp_path):
    from snd.stages.precompute.writer_process import spill, unspill

    rng = np.random.default_rng(0)
    fields = {"depth": rng.normal(size=(2, 2, 5, 7)).astype(np.float16),
              "op_cols": rng.integers(-5, 5, size=(2, 3, 4, 6)).astype(np.int16)[:, ::-1],  # not contiguous
              "empty": np.zeros((2, 0), np.uint8), "frames": {3: np.arange(10, dtype=np.uint8), 7: np.ones(4, np.uint8)},
              "note": "kept as is"}
    path = tmp_path / "0.bin"
    rest, index = spill(fields, path)
    assert rest == {"frames": {}, "note": "kept as is"} and path.stat().st_size == sum(
        a.nbytes for a in (fields["depth"], fields["op_cols"], *fields["frames"].values()))
    back = unspill(rest, index, path)
    assert not path.exists() and back.keys() == fields.keys() and back["note"] == "kept as is"
    for k in ("depth", "op_cols", "empty"):
        assert back[k].dtype == fields[k].dtype and np.array_equal(back[k], fields[k]), k
    assert back["frames"].keys() == {3, 7} and all(np.array_equal(back["frames"][i], fields["frames"][i]) for i in (3, 7))


def test_a_full_dev_shm_moves_the_spill_folder_to_disk_then_fails_the_scene(tmp_path, monkeypatch):
    """/dev/shm may be a container's 64 MB: a batch that does not fit moves the spill folder to disk for the rest of
    the run; if the disk fails too, the scene fails with a message naming the file (the run goes on)."""
    import errno

    import snd.stages.precompute.writer_process as wp

    if not wp.SHM.is_dir():
        pytest.skip("no /dev/shm")
    monkeypatch.setattr(wp, "SHM_FREE_MIN", 0)
    failed = []
    w = wp._WriterProcess(tmp_path, make_cfg(tmp_path, tmp_path), Encoding(), lambda *a: None, lambda *a: failed.append(a))
    real = wp.spill
    fails = {"left": 1}

    def flaky(fields, path):
        if fails["left"]:
            fails["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(fields, path)

    monkeypatch.setattr(wp, "spill", flaky)
    shm = w._spill
    assert shm.parent == wp.SHM
    op = w._spilled(("add", "s0", {"depth": np.ones((1, 2), np.float16)}))
    assert op[0] == "add_spilled" and Path(op[-1]).parent == w._spill and w._spill.parent != wp.SHM
    assert wp.unspill(op[2], op[3], Path(op[-1]))["depth"].tolist() == [[1.0, 1.0]] and not failed
    fails["left"] = 2
    assert w._spilled(("add", "s1", {"depth": np.ones((1, 2), np.float16)})) is None
    assert len(failed) == 1 and failed[0][0] == "s1" and "could not hand a batch" in failed[0][1]
    w._clean()
    assert not shm.exists() and not w._spill.exists()
