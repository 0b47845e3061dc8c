"""The probe's fast path changes how a step runs, never what it computes:

* the masked-sum losses (static shapes, no host reads) equal the boolean-index definitions, and stay
  finite where the old ones would not (no valid pixel; NaN ground truth);
* rows held on the device and rows streamed through the DataLoader give the same probe;
* the target cache round-trips every task's targets and resumes after a kill;
* on CUDA, the captured-graph step equals the eager step, and a resumed graph run equals a straight one.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from snd.eval.probes import DepthProbe, NormalProbe, ProbeData, ProbeSpec, SegProbe, train_probe
from snd.eval.probes.depth import sig_loss
from snd.eval.probes.normals import angular_nll
from snd.eval.probes.rows import DeviceRows, plan_residency, row_bytes
from snd.eval.targets import ensure_targets
from tests._stores import MemoryStore, identity_norm

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, UP, C = (4, 4), 4, 12
NORM = identity_norm(C)
_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda(f):
    return pytest.mark.gpu(_needs_cuda(f))


def _toy(n: int, seed: int = 0):
    """Tokens that linearly encode per-patch class ids; depth / normals / seg labels per pixel."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (n, *GRID), generator=g)
    tok = torch.cat([torch.randn(n, 1, C, generator=g),
                     (F.one_hot(ids, C).float() * 3 + 0.3 * torch.randn(n, *GRID, C, generator=g)).reshape(n, -1, C)], 1)
    pix = ids.repeat_interleave(UP, 1).repeat_interleave(UP, 2)
    dirs = F.normalize(torch.tensor([[0.0, 0, 1], [1, 0, 1], [0, -1, 0.3], [-1, 0.5, 0.5]]), dim=1)
    items = []
    for i in range(n):
        depth = torch.tensor([1.0, 2.0, 3.0, 4.0])[pix[i]]
        depth[0, :3] = 0.0  # invalid pixels
        seg = pix[i].clone()
        seg[1, :2] = 255
        items.append({"image": torch.zeros(3, 16, 16), "depth": depth, "seg": seg,
                      "normals": dirs[pix[i]].permute(2, 0, 1).contiguous()})
    return items, MemoryStore(tok)


def _probe(task: str):
    torch.manual_seed(0)
    if task == "depth":
        return DepthProbe(C, min_depth=1e-3, max_depth=5.0, warmup_loss_iters=4)
    return NormalProbe(C) if task == "normals" else SegProbe(C, num_classes=4)


SPEC = ProbeSpec(iters=24, batch=4, lr=1e-2, weight_decay=1e-2, schedule="mmcv_cosine", warmup=5, grad_clip=1.0)


# ---- losses --------------------------------------------------------------------------------------
def _sig_reference(pred, gt, warm_up=False, eps=1e-3):
    valid = gt > 0
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    if g.numel() == 0:
        return pred.sum() * 0.0
    if warm_up or g.numel() < 2:
        return torch.sqrt(0.15 * g.mean() ** 2 + 1e-12)
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


@pytest.mark.parametrize("n_valid", [0, 1, 2, 37])
@pytest.mark.parametrize("warm_up", [False, True])
def test_masked_sig_loss_equals_boolean_index_form(n_valid, warm_up):
    g = torch.Generator().manual_seed(n_valid)
    pred = (0.5 + 3 * torch.rand(2, 6, 7, generator=g)).requires_grad_()
    gt = torch.zeros(2, 6, 7)
    gt.view(-1)[torch.randperm(84, generator=g)[:n_valid]] = 0.5 + 3 * torch.rand(n_valid, generator=g)
    got, want = sig_loss(pred, gt, warm_up=warm_up), _sig_reference(pred, gt, warm_up=warm_up)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    (gp,) = torch.autograd.grad(got, pred)
    if n_valid:
        (wp,) = torch.autograd.grad(_sig_reference(pred, gt, warm_up=warm_up), pred)
        torch.testing.assert_close(gp, wp, rtol=1e-4, atol=1e-7)
    else:
        assert torch.equal(gp, torch.zeros_like(gp))  # no valid pixel: zero, not NaN


def test_masked_angular_nll_and_seg_ce_equal_their_definitions_and_ignore_nan_gt():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
    gt = F.normalize(torch.randn(2, 3, 5, 6, generator=g), dim=1)
    mask = torch.rand(2, 5, 6, generator=g) > 0.3
    cos = F.cosine_similarity(pred[:, :3], gt, dim=1).clamp(-1 + 1e-4, 1 - 1e-4)
    kappa = F.elu(pred[:, 3]) + 1.01
    nll = torch.log1p(torch.exp(-kappa * math.pi)) - torch.log1p(kappa ** 2) + kappa * torch.acos(cos)
    assert angular_nll(pred, gt, mask).item() == pytest.approx(nll[mask].mean().item(), rel=1e-6)
    gt_nan = torch.where(mask[:, None], gt, torch.nan)  # unknown normals as NaN: the gradient stays finite
    (gr,) = torch.autograd.grad(angular_nll(pred, gt_nan, mask), pred)
    assert torch.isfinite(gr).all() and gr.abs().sum() > 0
    assert angular_nll(pred, gt, torch.zeros_like(mask)).item() == 0.0

    probe = SegProbe(3, num_classes=5)
    feats = torch.randn(2, 3, 4, 4, generator=g)
    seg = torch.randint(0, 5, (2, 8, 8), generator=g)
    seg[0, :4] = 255
    want = F.cross_entropy(F.interpolate(probe(feats), size=(8, 8), mode="bilinear"), seg, ignore_index=255)
    assert probe.loss(feats, {"seg": seg}, step=0).item() == pytest.approx(want.item(), rel=1e-6)
    only_ignore = probe.loss(feats, {"seg": torch.full_like(seg, 255)}, step=0)
    only_ignore.backward()
    assert only_ignore.item() == 0.0 and torch.equal(probe.conv.weight.grad, torch.zeros_like(probe.conv.weight))


# ---- resident rows vs streamed rows --------------------------------------------------------------
@pytest.mark.parametrize("task", ["depth", "seg"])
def test_resident_rows_train_the_same_probe_as_streamed_rows(task):
    items, store = _toy(10)
    data = ProbeData(items, list(range(10)), task, store)
    a, b = _probe(task), _probe(task)
    ra = train_probe(a, data, SPEC, grid=GRID, norm=NORM, seed=5, residency="device")
    rb = train_probe(b, data, SPEC, grid=GRID, norm=NORM, seed=5, residency="stream")
    assert (ra["residency"], rb["residency"]) == ("device", "stream")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=1e-6, msg=k)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_residency_plan_follows_the_budget_and_rows_load_compactly():
    items, store = _toy(10)
    data = ProbeData(items, list(range(10)), "seg", store)
    per_row = row_bytes(data)
    assert per_row == 17 * C * 4 + 16 * 16  # float32 toy tokens + uint8 labels
    dev = torch.device("cpu")
    assert plan_residency(data, dev, "auto", budget_gib=10 * per_row / 2**30)[0] == "device"
    assert plan_residency(data, dev, "auto", budget_gib=9 * per_row / 2**30)[0] == "stream"
    assert plan_residency(ProbeData(items, list(range(10)), "seg"), dev, "device")[0] == "stream"  # live path
    rows = DeviceRows.load(data, dev, batch=3)
    assert rows.target.dtype == torch.uint8 and torch.equal(rows.target.long(), torch.stack([it["seg"] for it in items]))
    assert torch.equal(rows.tokens, store.t)
    bad = [dict(it, seg=it["seg"] + 300) for it in items]
    with pytest.raises(ValueError, match="0..255"):
        DeviceRows.load(ProbeData(bad, list(range(10)), "seg", store), dev)


# ---- target cache --------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["depth", "normals", "seg"])
def test_target_store_round_trips_and_trains_like_the_dataset(task, tmp_path):
    items, store = _toy(7)
    idx = [6, 0, 3, 2, 5, 1, 4]
    ts = ensure_targets(items, idx, task, cache_dir=tmp_path, dataset_name="toy", split="train", img_hw=(16, 16), batch=3)
    for r, i in enumerate(idx):
        got, want = ts.target(r), items[i][task]
        assert got.dtype == want.dtype
        if task == "normals":
            torch.testing.assert_close(got, want, rtol=0, atol=1e-3)  # float16 storage
        elif task == "depth":  # float16 storage: 2^-11 relative, invalid values kept as they are
            torch.testing.assert_close(got, want, rtol=2.0**-11, atol=0, equal_nan=True)
            assert torch.equal(got == 0, want == 0) and torch.equal(got.isnan(), want.isnan())
        else:
            assert torch.equal(got, want)
    # the cached targets stand in for the dataset: training gives the same probe
    tok = MemoryStore([store.t[i] for i in idx])
    a, b = _probe(task), _probe(task)
    train_probe(a, ProbeData(items, idx, task, tok), SPEC, grid=GRID, norm=NORM, residency="stream")
    train_probe(b, ProbeData(None, idx, task, tok, targets=ts), SPEC, grid=GRID, norm=NORM, residency="stream")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=1e-6 if task == "seg" else 1e-3, msg=k)


def test_cached_depth_rounds_within_float16_and_keeps_invalid_values():
    from snd.eval.targets import _compact

    d = torch.tensor([[1e-3, 0.3333, 1.2345, 9.87654], [79.999, 0.0, math.nan, math.inf]])
    got = torch.from_numpy(_compact("depth", d, "toy")).float()
    ok = torch.isfinite(d) & (d > 0)
    assert ((got[ok] - d[ok]).abs() / d[ok]).max() <= 2.0**-11 and (got[ok] != d[ok]).any()  # rounded, within 2^-11
    assert got[1, 1] == 0 and got[1, 2].isnan() and got[1, 3] == math.inf


def test_target_store_resumes_after_a_kill_and_rebuilds_for_other_rows(tmp_path):
    items, _ = _toy(7)

    class Dies:
        def __init__(self):
            self.calls = 0

        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            self.calls += 1
            if self.calls == 5:
                raise RuntimeError("killed")
            return items[i]

    kw = dict(cache_dir=tmp_path, dataset_name="toy", split="train", img_hw=(16, 16), batch=2)
    ds = Dies()
    with pytest.raises(RuntimeError, match="killed"):
        ensure_targets(ds, list(range(7)), "seg", **kw)
    prog = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert prog["n_done"] == 2 and not prog["complete"]  # the first item (shape probe) + one block of 2
    ds.calls = 100
    ts = ensure_targets(ds, list(range(7)), "seg", **kw)
    assert ds.calls == 100 + 1 + 5  # shape probe + the 5 missing rows only
    assert all(torch.equal(ts.target(i), items[i]["seg"]) for i in range(7))
    n = ds.calls
    ensure_targets(ds, list(range(7)), "seg", **kw)
    assert ds.calls == n + 1  # complete: only the shape probe
    sub = ensure_targets(items, [1, 2], "seg", **kw)
    assert sub.path != ts.path and torch.equal(sub.target(0), items[1]["seg"])


# ---- CUDA graph ----------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("task,residency", [("depth", "device"), ("normals", "device"), ("seg", "device"),
                                            ("seg", "stream")])
def test_graph_step_equals_eager_step_on_cuda(task, residency):
    items, store = _toy(10)
    data = ProbeData(items, list(range(10)), task, store)
    a, b = _probe(task), _probe(task)
    # streamed with workers: the pin-memory thread allocates while the graph is being captured
    kw = dict(grid=GRID, norm=NORM, device="cuda", seed=2, residency=residency, num_workers=2 if residency == "stream" else 0)
    ra = train_probe(a, data, SPEC, graph="on", **kw)
    rb = train_probe(b, data, SPEC, graph="off", **kw)
    assert ra["graph"] and not rb["graph"] and ra["residency"] == residency
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)


@cuda
def test_graph_run_resumes_exactly_on_cuda(tmp_path):
    items, store = _toy(10)
    data = ProbeData(items, list(range(10)), "depth", store)
    straight, resumed = _probe("depth"), _probe("depth")
    train_probe(straight, data, SPEC, grid=GRID, norm=NORM, device="cuda", graph="on", seed=1)
    ck = tmp_path / "p.safetensors"
    train_probe(resumed, data, SPEC, grid=GRID, norm=NORM, device="cuda", graph="on", seed=1, ckpt=ck, stop_after=11)
    torch.manual_seed(9)  # a different init: everything must come from the checkpoint
    fresh = DepthProbe(C, min_depth=1e-3, max_depth=5.0, warmup_loss_iters=4)
    out = train_probe(fresh, data, SPEC, grid=GRID, norm=NORM, device="cuda", graph="on", seed=1, ckpt=ck)
    assert out["start_step"] == 11 and out["graph"]
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(v, fresh.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)


# ---- the reordered heads -------------------------------------------------------------------------
def test_resize_bilinear_equals_interpolate_and_heads_equal_the_official_order():
    from snd.eval.probes.resize import resize_bilinear

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64)
    for size in [(28, 36), (30, 41), (7, 9), (5, 4)]:
        want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(resize_bilinear(x, size), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(resize_bilinear(x, size, channels_last=True), want.permute(0, 2, 3, 1), rtol=0, atol=1e-12)
    feats = torch.randn(2, 2 * C, *GRID, generator=g)
    up = lambda f: F.interpolate(f, scale_factor=4, mode="bilinear", align_corners=False)  # noqa: E731
    # depth: the official upsample-then-conv head, bins weighted by normalised ReLU(logits) + 0.1
    d = _probe("depth")
    p = torch.relu(d.conv(up(feats))) + 0.1
    ref = torch.einsum("bkhw,k->bhw", p / p.sum(1, keepdim=True), d.bins)[:, None]
    torch.testing.assert_close(d(feats), ref, rtol=1e-5, atol=1e-6)
    n = _probe("normals")
    torch.testing.assert_close(n(feats[:, :C]), n.conv(up(feats[:, :C])), rtol=1e-5, atol=1e-6)
    # seg: the loss and its gradient match CE over F.interpolate'd logits
    s = _probe("seg")
    seg = torch.randint(0, 4, (2, 18, 23), generator=g)
    seg[1, :5] = 255
    loss = s.loss(feats[:, :C], {"seg": seg}, step=0)
    (gs,) = torch.autograd.grad(loss, s.conv.weight)
    ref = F.cross_entropy(F.interpolate(s(feats[:, :C]), size=(18, 23), mode="bilinear", align_corners=False), seg,
                          ignore_index=255)
    (gr,) = torch.autograd.grad(ref, s.conv.weight)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gs, gr, rtol=1e-4, atol=1e-7)


def test_ordered_writes_commit_a_prefix_when_blocks_finish_out_of_order_or_fail(tmp_path):
    import time

    import numpy as np

    from snd.eval.rowstore import OrderedWrites, RowWriter

    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    w = RowWriter(tmp_path / "r.zarr", tmp_path / "r.json", {"n": 8}, {"x": ((3,), "float32", None)}, 8)

    def slow():
        time.sleep(0.3)  # the first block lands last
        return {"x": rows[0:2]}

    def boom():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with OrderedWrites(w, threads=3) as out:
            out.submit(slow, 2)
            out.submit(lambda: {"x": rows[2:4]}, 2)
            out.submit(boom, 2)
            out.submit(lambda: {"x": rows[6:8]}, 2)
    state = json.loads((tmp_path / "r.json").read_text())
    assert state["n_done"] == 4 and not state["complete"]  # blocks 0-1 committed in order, not past the failure
    resumed = RowWriter(tmp_path / "r.zarr", tmp_path / "r.json", {"n": 8}, {"x": ((3,), "float32", None)}, 8)
    assert resumed.done == 4
    with OrderedWrites(resumed, threads=2) as out:
        out.submit(lambda: {"x": rows[4:6]}, 2)
        out.submit(lambda: {"x": rows[6:8]}, 2)
    resumed.finish()
    import zarr

    assert np.array_equal(zarr.open_array(str(tmp_path / "r.zarr" / "x"), mode="r")[:], rows)
