"""Probes trained together (`train_probes`) are the probes trained alone:

* probes over the same rows share one source (tokens read once, rows held once) and probes over other rows
  step beside them, yet every probe ends with the weights it gets alone (device-resident and streamed rows);
* a shared run resumes exactly when its probes stopped at different steps;
* waves pack resident rows into the budget; the rewritten depth head and segmentation loss compute the
  official functions;
* on CUDA, probes replayed as graphs on their own streams equal the eager probes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from snd.eval.probes import ProbeData, ProbeSpec, train_probe
from snd.eval.probes.depth import bin_depth
from snd.eval.probes.rows import group_row_bytes, row_bytes
from snd.eval.probes.seg import masked_ce_sum
from snd.eval.probes.train import ProbeJob, _waves, train_probes
from tests.test_eval_probe_speed import GRID, NORM, SPEC, _probe, _toy, cuda

pytestmark = pytest.mark.usefixtures("one_thread")

NORMALS_SPEC = ProbeSpec(iters=9, batch=3, lr=1e-2, weight_decay=1e-2, schedule="probe3d_cosine", warmup=2)


def _jobs(items, store, other_items, other_store, ckpts=None):
    """depth + seg + normals over one store (depth and seg share a source; normals has its own batch size),
    and a depth probe over another store."""
    specs = {"depth": SPEC, "seg": SPEC, "normals": NORMALS_SPEC}
    jobs = []
    for i, (task, its, st) in enumerate([("depth", items, store), ("seg", items, store), ("normals", items, store),
                                         ("depth", other_items, other_store)]):
        jobs.append(ProbeJob(_probe(task), ProbeData(its, list(range(len(its))), task, st), specs[task],
                             ckpt=None if ckpts is None else ckpts[i], ckpt_every=5))
    return jobs


def _assert_same(a, b, atol=1e-6):
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("residency", ["device", "stream"])
def test_probes_trained_together_equal_probes_trained_alone(residency):
    items, store = _toy(10)
    other, other_store = _toy(7, seed=1)
    together = _jobs(items, store, other, other_store)
    stats = train_probes(together, grid=GRID, norm=NORM, seed=4, residency=residency)
    assert [s["steps"] for s in stats] == [24, 24, 9, 24]
    assert all(s["trained_together"] == 4 and s["residency"] == residency for s in stats)
    alone = _jobs(items, store, other, other_store)
    for job in alone:
        train_probe(job.probe, job.data, job.spec, grid=GRID, norm=NORM, seed=4, residency=residency)
    for a, b in zip(together, alone):
        _assert_same(a.probe, b.probe)
    # depth and seg over one store (same batch) read one source; normals (batch 3) and the other store not
    assert [s["rows_shared_by"] for s in stats] == [2, 2, 1, 1]


def test_a_shared_run_resumes_exactly_when_its_probes_stopped_at_different_steps(tmp_path):
    items, store = _toy(10)
    other, other_store = _toy(7, seed=1)
    straight = _jobs(items, store, other, other_store)
    train_probes(straight, grid=GRID, norm=NORM, seed=2)
    ckpts = [tmp_path / f"p{i}.safetensors" for i in range(4)]
    # depth alone first, stopped at step 11; then all four together, stopped after 6 more steps each
    first = _jobs(items, store, other, other_store, ckpts)
    train_probes(first[:1], grid=GRID, norm=NORM, seed=2, stop_after=11)
    mid = train_probes(_jobs(items, store, other, other_store, ckpts), grid=GRID, norm=NORM, seed=2, stop_after=6)
    assert [m["steps"] for m in mid] == [17, 6, 6, 6]
    torch.manual_seed(9)  # fresh heads: everything must come from the checkpoints
    resumed = _jobs(items, store, other, other_store, ckpts)
    for j in resumed:
        for p in j.probe.parameters():
            torch.nn.init.normal_(p)
    out = train_probes(resumed, grid=GRID, norm=NORM, seed=2)
    assert [o["start_step"] for o in out] == [17, 6, 6, 6] and [o["steps"] for o in out] == [24, 24, 9, 24]
    for a, b in zip(straight, resumed):
        _assert_same(a.probe, b.probe, atol=1e-5)


def test_waves_pack_resident_rows_into_the_budget_and_results_do_not_change():
    items, store = _toy(10)
    other, other_store = _toy(7, seed=1)
    per_shared = group_row_bytes([ProbeData(items, list(range(10)), t, store) for t in ("depth", "seg")])
    assert per_shared == row_bytes(ProbeData(items, list(range(10)), "depth", store)) + 16 * 16  # + uint8 seg
    # a budget that holds each source's rows alone but no two together: three waves, the same probes
    per_normals = row_bytes(ProbeData(items, list(range(10)), "normals", store))
    budget = (per_normals * 10 + 1) / 2**30
    jobs = _jobs(items, store, other, other_store)
    stats = train_probes(jobs, grid=GRID, norm=NORM, seed=4, resident_gib=budget)
    assert len({s["wave"] for s in stats}) == 3 and all(s["residency"] == "device" for s in stats)
    ref = _jobs(items, store, other, other_store)
    train_probes(ref, grid=GRID, norm=NORM, seed=4, resident_gib=64.0)
    for a, b in zip(jobs, ref):
        _assert_same(a.probe, b.probe)
    # one at a time when asked
    one = train_probes(_jobs(items, store, other, other_store), grid=GRID, norm=NORM, seed=4, max_together=1)
    waves = [s["wave"] for s in one]
    assert waves[0] == waves[1] and len(set(waves)) == 3  # a shared source is never split


class _G:
    def __init__(self, need, where="device", runs=1):
        self.need, self.where, self.runs = need, where, [None] * runs


def test_wave_packing_first_fit_largest_first():
    gs = [_G(5), _G(3), _G(4), _G(9, "stream"), _G(2)]
    waves = _waves(gs, budget=8, max_together=None)  # type: ignore[arg-type]
    assert [[g.need for g in w] for w in waves] == [[5, 3, 9], [4, 2]]  # streamed rows take no budget
    waves = _waves(gs, budget=100, max_together=2)  # type: ignore[arg-type]
    assert all(sum(len(g.runs) for g in w) <= 2 for w in waves) and sum(len(w) for w in waves) == 5
    assert _waves([_G(20)], budget=8, max_together=None)[0][0].need == 20  # too big alone: its own wave


def test_bin_depth_and_masked_ce_equal_the_official_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 256, generator=g, dtype=torch.float64)
    bins = torch.linspace(1e-3, 10, 256, dtype=torch.float64)
    p = torch.relu(logits) + 0.1
    torch.testing.assert_close(bin_depth(logits, bins), (p / p.sum(-1, keepdim=True)) @ bins, rtol=1e-12, atol=0)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (200,), generator=g)
    t[::4] = 255
    got = masked_ce_sum(x, t)
    (gx,) = torch.autograd.grad(got, x)
    want = F.cross_entropy(x, t, ignore_index=255, reduction="sum")
    (wx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(gx, wx, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: masked_ce_sum(z, t), (x,))
    (g0,) = torch.autograd.grad(masked_ce_sum(x, torch.full_like(t, 255)), x)  # nothing labelled: 0, no gradient
    assert torch.equal(g0, torch.zeros_like(x))


@cuda
def test_probes_on_their_own_streams_equal_eager_probes_on_cuda():
    items, store = _toy(10)
    other, other_store = _toy(7, seed=1)
    graphed = _jobs(items, store, other, other_store)
    stats = train_probes(graphed, grid=GRID, norm=NORM, seed=3, device="cuda", graph="on", residency="device")
    assert all(s["graph"] for s in stats)
    eager = _jobs(items, store, other, other_store)
    train_probes(eager, grid=GRID, norm=NORM, seed=3, device="cuda", graph="off", residency="device", max_together=1)
    for a, b in zip(graphed, eager):
        for k, v in a.probe.state_dict().items():
            torch.testing.assert_close(v, b.probe.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
