"""`snd bench precompute`'s GPU-busy measure and scripts/gpu_precompute_ab.py's variants, on hand-made inputs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from snd.bench.precompute import _busy

REPO = Path(__file__).resolve().parents[1]


class _Event:
    def __init__(self, start: int, end: int, stream: int, kind: str = "kernel", cuda: bool = True):
        self.s, self.e, self.stream, self.kind, self.cuda = start, end, stream, kind, cuda

    def device_type(self):
        return torch.autograd.DeviceType.CUDA if self.cuda else torch.autograd.DeviceType.CPU

    def activity_type(self) -> str:
        return self.kind

    def name(self) -> str:
        return {"kernel": "void conv_kernel<...>", "gpu_memcpy": "Memcpy HtoD (Pinned -> Device)"}.get(self.kind, "aten::mm")

    def start_ns(self) -> int:
        return self.s

    def end_ns(self) -> int:
        return self.e

    def device_resource_id(self) -> int:
        return self.stream


class _Prof:
    """What `_busy` reads of a torch.profiler run: kineto's events."""

    def __init__(self, events):
        self.profiler = type("P", (), {"kineto_results": type("K", (), {"events": lambda _self: events})()})()


def test_busy_is_the_union_of_kernel_intervals_in_the_window():
    ev = [_Event(0, 10, 7), _Event(5, 15, 7), _Event(20, 30, 8), _Event(8, 12, 8),
          _Event(0, 40, 7, kind="gpu_memcpy"), _Event(0, 40, 1, cuda=False)]  # a copy and a CPU op do not count
    b = _busy(_Prof(ev), 0, 40)
    assert b["fraction"] == pytest.approx(25 / 40)  # [0, 15] and [20, 30]
    assert b["per_stream"] == {"7": pytest.approx(15 / 40), "8": pytest.approx(14 / 40)}  # [8, 12] + [20, 30]
    assert list(b["per_stream"]) == ["7", "8"] and b["window_s"] == pytest.approx(40e-9)
    c = _busy(_Prof(ev), 10, 25)  # clipped to the window: [10, 15] and [20, 25]
    assert c["fraction"] == pytest.approx(10 / 15)
    assert _busy(_Prof([]), 0, 10)["fraction"] == 0


def test_busy_tells_copies_by_name_when_events_have_no_activity_type():
    """torch 2.11 (the device's) has no `activity_type()` on kineto events (its first traced run failed on it)."""

    class Old(_Event):
        activity_type = None  # as if absent: `getattr(e, "activity_type", None)` is None

    ev = [Old(0, 10, 7), Old(0, 40, 7, kind="gpu_memcpy")]
    assert _busy(_Prof(ev), 0, 40)["fraction"] == pytest.approx(10 / 40)


def test_ab_script_variants():
    spec = importlib.util.spec_from_file_location("ab", REPO / "scripts/gpu_precompute_ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert ab.overrides("inline") == {"operator_thread": False}
    assert ab.overrides("operator_chunk=24,operator_thread=0") == {"operator_chunk": 24, "operator_thread": False}
    for bad in ("nope", "operator_chunk", "not_a_field=1"):
        with pytest.raises(SystemExit, match="unknown variant"):
            ab.overrides(bad)
    assert ab.overrides("workers1") == {"operator_workers": 1}
    assert ab.overrides("process") == ab.overrides("writer=process") == {"writer": "process"}
    assert ab.overrides("process-zarrs") == ab.overrides("writer=process,writer_codecs=zarrs") == {
        "writer": "process", "writer_codecs": "zarrs"}
    assert ab.overrides("old-writer") == {"writer": "thread"}
    assert ab.overrides("zarrs") == {"writer": "thread", "writer_codecs": "zarrs"}
    import sys

    keep = sys.getswitchinterval()
    assert ab.overrides("switch=0.001") == {}
    with ab.switch("switch=0.001"):
        assert sys.getswitchinterval() == pytest.approx(0.001)
    assert sys.getswitchinterval() == keep
    assert ab.schedule(["a", "b", "c"], 2, True) == [(0, "a", False), (0, "b", False), (0, "c", False),
                                                      (1, "c", False), (1, "b", False), (1, "a", False),
                                                      (2, "a", True), (2, "b", True), (2, "c", True)]
    # builder-file: the defaults, with another module's build_operators where stage one looks it up, then restored
    import snd.splat.operator as op

    assert ab.overrides("builder-file") == {}
    ours = op.build_operators
    with ab.builder(str(REPO / "snd/splat/operator_build.py")):  # a second copy of ours
        assert op.build_operators is not ours
        assert op.build_operators.__code__.co_filename.endswith("gpu_precompute_ab.py")  # the script's wrapper
    assert op.build_operators is ours


def test_operator_workers_build_at_once_and_hand_on_in_submission_order(monkeypatch):
    """`--operator-workers N`: batches are built by N threads at once (a slow first batch does not hold the
    others), yet the writer gets every item in the order submitted, scene events included."""
    import queue
    import threading
    import time
    from types import SimpleNamespace

    from snd.cache.schema import Encoding
    from snd.stages.precompute import operators as mod

    delays = [0.3, 0.0, 0.2, 0.0, 0.1, 0.0]
    active, peak, lock = [0], [0], threading.Lock()

    def build(fields, batch, *a, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(delays[fields["k"]])
        with lock:
            active[0] -= 1
        return {"built": fields["k"]}

    monkeypatch.setattr(mod, "_build_operators", build)
    for workers, threaded in ((3, True), (1, True), (3, False)):
        wq: queue.Queue = queue.Queue()
        added: list = []
        peak[0] = 0
        st = mod.OperatorStage(wq, Encoding(), object(), torch.device("cpu"), {}, chunk=1, stream_priority=None,
                               on_added=lambda scene, n, info: added.append((scene, n)), threaded=threaded,
                               workers=workers)
        st.start()
        st.submit(("start", "A", 6, []))
        for k in range(6):
            st.submit(("add", "AB"[k // 3], SimpleNamespace(ctx_K=[0, 0]), {"k": k}, {"wait_data": 0.0}, None))
            if k == 2:
                st.submit(("commit", "A"))
                st.submit(("start", "B", 3, []))
        st.submit(("commit", "B"))
        st.finish()
        items = [wq.get_nowait() for _ in range(wq.qsize())]
        assert [i[0] for i in items] == ["start", "add", "add", "add", "commit", "start", "add", "add", "add", "commit"]
        assert [i[2]["built"] for i in items if i[0] == "add"] == list(range(6))
        assert added == [("A", 2)] * 3 + [("B", 2)] * 3
        if workers == 3 and threaded:
            assert peak[0] >= 2  # the first batch's 0.3 s did not hold the others
        else:
            assert peak[0] == 1


def test_an_operator_worker_error_reaches_the_main_thread(monkeypatch):
    import queue
    from types import SimpleNamespace

    from snd.cache.schema import Encoding
    from snd.stages.precompute import operators as mod

    def build(fields, batch, *a, **kw):
        if fields["k"] == 1:
            raise RuntimeError("builder bug")
        return {}

    monkeypatch.setattr(mod, "_build_operators", build)
    st = mod.OperatorStage(queue.Queue(), Encoding(), object(), torch.device("cpu"), {}, chunk=1, stream_priority=None,
                           on_added=lambda *a: None, workers=2)
    st.start()
    with pytest.raises(RuntimeError, match="builder bug"):
        for k in range(50):  # the error surfaces at a later submit or at finish
            st.submit(("add", "A", SimpleNamespace(ctx_K=[0]), {"k": k}, {"wait_data": 0.0}, None))
        st.finish()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        mod.OperatorStage(queue.Queue(), Encoding(), None, torch.device("cpu"), {}, chunk=1, stream_priority=None,
                          on_added=lambda *a: None, workers=0)


def test_writer_rates_script_writes_and_times_a_store(tmp_path, capsys):
    """scripts/writer_rates.py at a small size: every pair written (twice: alone and beside the spinning thread), by
    the thread and by the writer process, the same bytes; Python's switch interval restored after."""
    import json
    import sys

    spec = importlib.util.spec_from_file_location("writer_rates", REPO / "scripts/writer_rates.py")
    wr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wr)
    out = tmp_path / "w.json"
    wr.main(["--height", "28", "--width", "42", "--batches", "2", "--batch-pairs", "3", "--switch-interval", "0.002",
             "--writer", "thread", "process", "--out", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [r["writer"] for r in lines] == ["thread", "process"]
    for r in lines:
        assert r["switch_interval_s"] == 0.002 and r["pairs"] == r["beside_a_spinning_thread"]["pairs"] == 6
        assert r["mb_per_pair"] > 0 and r["mb_per_pair"] == r["beside_a_spinning_thread"]["mb_per_pair"]  # same bytes
        assert r["add_ms_per_pair"] > 0 and 0 < r["python_thread_share"]
    assert lines[0]["mb_per_pair"] == lines[1]["mb_per_pair"]
    assert sys.getswitchinterval() == pytest.approx(0.005)
