"""The batched operator builder (`snd.splat.operator_build`) equals, job by job, the one-target builder
snd shipped before it (`tests/operator_reference.py`: dense [P, J] matrix, `torch.topk` per row)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snd.splat.from_depth import gaussians_from_depth
from snd.splat.operator import TransferOperator, apply_operator, build_operators
from tests.operator_reference import reference_operator
from tests.test_splat_target import _planes_scene

CTX_HW = (6, 8)
OUT_HW = (5, 7)
# two pairs seen from different places; pair 0 has two targets, pair 1 one
EYES = [[(-0.35, -1.0, 1.3), (0.35, -1.0, 1.3), (0.0, -2.2, 1.6), (0.1, -1.6, 1.2)],
        [(-0.6, -0.6, 1.0), (0.2, -0.8, 1.4), (-0.2, -1.5, 1.1)]]
JOBS = [(1, 2), (0, 2), (0, 3)]  # (pair, camera of the target); job order != pair order, chunk=2 splits a pair


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


@pytest.fixture(scope="module")
def scenes():
    out = []
    for eyes in EYES:
        cams, depth, ids = _planes_scene(eyes)
        K = torch.stack([_t(c.K) for c in cams])
        g = gaussians_from_depth(_t(depth[:2]), K[:2], torch.stack([_t(c.c2w) for c in cams[:2]]), scale_mult=0.7,
                                 opacity=0.9)
        out.append({"g": g, "masks": torch.as_tensor(ids), "K": K, "w2c": torch.stack([_t(c.w2c) for c in cams])})
    # a Gaussian that no renderer may draw (non-finite) and one below 1/255: both must be skipped alike
    out[1]["g"].means[0, 0, 0] = float("nan")
    out[1]["g"].opacities[1, 3, 3] = 1e-4
    return out


def _dense(op: TransferOperator, J: int) -> torch.Tensor:
    P = op.cols.shape[0]
    return torch.zeros(P, J, dtype=torch.float64).scatter_add_(1, op.cols, op.vals.double())


def _build(scenes, chunk, **kw):
    return build_operators([s["g"] for s in scenes], torch.stack([s["masks"][:2] for s in scenes]),
                           torch.stack([scenes[p]["masks"][c] for p, c in JOBS]),
                           torch.stack([scenes[p]["K"][c] for p, c in JOBS]),
                           torch.stack([scenes[p]["w2c"][c] for p, c in JOBS]),
                           torch.tensor([p for p, _ in JOBS]), CTX_HW, OUT_HW, chunk=chunk, backend="torch", **kw)


@pytest.mark.parametrize("protocol", ["official", "snd"])
@pytest.mark.parametrize("kw", [dict(), dict(row_cap=3, inst_cap=2), dict(upsample="bilinear", blend_weight=1.0)])
def test_batched_equals_one_by_one(scenes, protocol, kw):
    ops = _build(scenes, chunk=2, protocol=protocol, **kw)
    J = 2 * CTX_HW[0] * CTX_HW[1]
    torch.manual_seed(0)
    feats = torch.randn(2, 5, *CTX_HW)
    for n, (p, c) in enumerate(JOBS):
        s = scenes[p]
        ref = reference_operator(s["g"], s["masks"][:2], s["masks"][c], s["K"][c], s["w2c"][c], CTX_HW, OUT_HW,
                                 protocol=protocol, **kw)
        got = TransferOperator(**{k: v[n] for k, v in vars(ops).items()})
        torch.testing.assert_close(_dense(got, J), _dense(ref, J), atol=1e-7, rtol=1e-6)
        assert torch.equal(got.valid, ref.valid)
        assert int(got.max_row_nnz) == int(ref.max_row_nnz)
        torch.testing.assert_close(got.dropped_direct, ref.dropped_direct, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.dropped_inst, ref.dropped_inst, atol=1e-6, rtol=1e-5)
        a, _ = apply_operator(got, feats, OUT_HW)
        b, _ = apply_operator(ref, feats, OUT_HW)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert b.abs().max() > 0.1  # not a trivially empty operator
    if "row_cap" in kw:  # the caps bind here, so this case checks that the same coefficients are kept
        assert (ops.dropped_direct > 0).all() and (ops.dropped_inst > 0).all()
    else:
        assert (ops.dropped_direct == 0).all() and (ops.dropped_inst == 0).all()


def test_patches_sharing_tap_pixels_equal_the_reference(scenes):
    """Downsampling 48x64 renders to 30x40 (by less than 2) makes neighbouring patches read the same pixel, which
    the builder handles with one pass per tap slot instead of one lookup per entry."""
    from snd.splat.operator_build import _downsample_taps

    out_hw = (30, 40)
    pix, _ = _downsample_taps(48, 64, *out_hw, torch.device("cpu"))
    assert torch.bincount(pix.reshape(-1)).max() > 1  # the case this test is about
    ops = build_operators([s["g"] for s in scenes], torch.stack([s["masks"][:2] for s in scenes]),
                          torch.stack([scenes[p]["masks"][c] for p, c in JOBS]),
                          torch.stack([scenes[p]["K"][c] for p, c in JOBS]),
                          torch.stack([scenes[p]["w2c"][c] for p, c in JOBS]),
                          torch.tensor([p for p, _ in JOBS]), CTX_HW, out_hw, chunk=2, backend="torch")
    J = 2 * CTX_HW[0] * CTX_HW[1]
    for n, (p, c) in enumerate(JOBS):
        s = scenes[p]
        ref = reference_operator(s["g"], s["masks"][:2], s["masks"][c], s["K"][c], s["w2c"][c], CTX_HW, out_hw)
        got = TransferOperator(**{k: v[n] for k, v in vars(ops).items()})
        torch.testing.assert_close(_dense(got, J), _dense(ref, J), atol=1e-7, rtol=1e-6)
        assert _dense(ref, J).abs().sum() > 1.0 and torch.equal(got.valid, ref.valid)


def test_chunking_does_not_change_the_result(scenes):
    one = _build(scenes, chunk=1)
    allj = _build(scenes, chunk=8)
    for k, v in vars(one).items():
        assert torch.equal(v, getattr(allj, k)), k


def test_no_jobs_gives_empty_operators(scenes):
    ops = build_operators([scenes[0]["g"]], scenes[0]["masks"][None, :2], torch.zeros(0, *scenes[0]["masks"].shape[1:]),
                          torch.zeros(0, 3, 3), torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.long), CTX_HW, OUT_HW,
                          backend="torch")
    assert ops.cols.shape == (0, OUT_HW[0] * OUT_HW[1], 64) and ops.inst.shape == (0, 128, 96)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_batched_operators_match_one_by_one_and_torch():
    """On the GPU at the real size: gsplat contributions of 4 jobs in one call == one job per call, and
    each job's operator == the torch plan's (the backends differ by ~1e-4, as for a single render)."""
    from snd.splat.gaussians import PixelGaussians
    from snd.splat.operator import build_operator
    from snd.train.distiller import rigid_inverse
    from snd.train.synthetic import synthetic_sample

    dev = torch.device("cuda")
    xs = [synthetic_sample(i, img_hw=(574, 868), scaffold_hw=(576, 880)) for i in range(3)]
    gs = [PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"]).to(device=dev) for x in xs]
    masks = torch.stack([x["ctx_masks"] for x in xs]).to(dev)
    src = [2, 0, 1, 0]  # whose target camera each job uses; pair[n] = whose Gaussians
    pair = torch.tensor([2, 0, 1, 1], device=dev)
    tm = torch.stack([xs[i]["tgt_mask"] for i in src]).to(dev)
    tK = torch.stack([xs[i]["tgt_K"] for i in src]).to(dev)
    tw = torch.stack([rigid_inverse(xs[i]["tgt_c2w"]) for i in src]).to(dev)
    grid = (41, 62)
    args = (gs, masks, tm, tK, tw, pair, grid, grid)
    together = build_operators(*args, backend="gsplat", chunk=4)
    alone = build_operators(*args, backend="gsplat", chunk=1)
    feats = torch.randn(4, 2, 64, *grid, device=dev)
    a, va = apply_operator(together, feats, grid)
    b, vb = apply_operator(alone, feats, grid)
    assert torch.equal(va, vb)
    assert (a - b).norm() / b.norm() < 1e-6
    for n in range(4):
        ref = build_operator(gs[int(pair[n])], masks[int(pair[n])], tm[n], tK[n], tw[n], grid, grid, backend="torch")
        r, vr = apply_operator(ref, feats[n], grid)
        assert (a[n] - r).norm() / r.norm() < 1e-3
        assert (va[n] != vr).float().mean() < 0.005


def test_chunk_out_of_gpu_memory_is_retried_in_halves(scenes, monkeypatch, caplog):
    """A chunk whose compositing weights do not fit the GPU is retried in halves (the default of 8 ran an 80 GB
    H100 out of memory beside MVSplat's CUDA graphs): same operators, and the shrunk size is kept for the
    caller's later batches. A single target that does not fit still fails (nothing smaller to try)."""
    import snd.splat.operator_build as ob

    want = _build(scenes, chunk=1)
    real, sizes = ob.contributions, []

    def tight(gaussians, pair, *a, **k):  # "GPU memory" for one target at a time
        sizes.append(int(pair.numel()))
        if pair.numel() > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(gaussians, pair, *a, **k)

    monkeypatch.setattr(ob, "contributions", tight)
    size = ob.ChunkSize(8)
    with caplog.at_level("WARNING", logger=ob.__name__):
        got = _build(scenes, chunk=size)
    assert sizes == [3, 1, 1, 1]  # 3 jobs (all of them) failed; the size halved to 1 and stayed there
    assert (size.size, size.initial) == (1, 8)
    assert "ran out of GPU memory" in caplog.text and "--operator-chunk 1" in caplog.text
    for k, v in vars(want).items():
        assert torch.equal(getattr(got, k), v), k
    sizes.clear()
    _build(scenes, chunk=size)  # the next batch starts at the size that fitted: no failed attempt
    assert sizes == [1, 1, 1]

    monkeypatch.setattr(ob, "contributions", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("one")))
    with pytest.raises(torch.OutOfMemoryError):
        _build(scenes, chunk=ob.ChunkSize(1))


def test_direct_rows_keep_the_largest_with_ties_by_column():
    """`_direct_ell` against a hand-computed selection: repeated keys are summed, a sum of 0 is no entry, each row
    keeps its `row_cap` largest |values| ranked by |value| then column (a tie at the cut keeps the lower column),
    the dropped share counts the rest, and a non-finite sum marks its row instead of vanishing."""
    from snd.splat.operator_rows import _direct_ell

    J, P, N, cap = 6, 2, 2, 2
    entries = {  # (job, patch, column): summed value
        (0, 0, 4): 3.0, (0, 0, 1): -2.0, (0, 0, 0): 2.0, (0, 0, 5): 2.0, (0, 0, 2): 1.0,  # tie at the cut: 0 kept, 1, 5 not
        (0, 1, 3): 0.5,  # fewer entries than the cap
        (1, 0, 2): 1.0, (1, 0, 3): -1.0,  # a tie that fits entirely
    }
    key, val = [], []
    for (n, p, j), v in entries.items():  # each value as two halves: repeated keys must be summed
        key += [(n * P + p) * J + j] * 2
        val += [v / 2, v / 2]
    key += [(1 * P + 1) * J + 0] * 2  # a sum of 0: no entry
    val += [0.25, -0.25]
    cols, ell, nnz, dropped = _direct_ell(torch.tensor(key), torch.tensor(val, dtype=torch.float64), N, P, J, cap)
    assert cols.tolist() == [[4, 0], [3, 0], [2, 3], [0, 0]]
    assert ell.tolist() == [[3.0, 2.0], [0.5, 0.0], [1.0, -1.0], [0.0, 0.0]]
    assert nnz.tolist() == [[5, 1], [2, 0]]
    torch.testing.assert_close(dropped, torch.tensor([5.0 / 10.5, 0.0], dtype=torch.float64))
    bad = torch.tensor(val + [float("nan")], dtype=torch.float64)
    _, ell, _, _ = _direct_ell(torch.tensor(key + [(1 * P + 1) * J + 4]), bad, N, P, J, cap)
    assert torch.isnan(ell[3, 0]) and torch.isfinite(ell[:3]).all()


@pytest.mark.parametrize("grid", ["corners", "centres"])
def test_transposed_taps_structure_equals_coalescing_each_pair(grid):
    """The shared CSR structure plus one `index_add_` of a pair's weights equals that pair's taps transposed and
    coalesced, for two pairs with different masks (the columns are the masks' business of neither); border
    pixels whose taps clamp to one patch sum into one entry."""
    from snd.splat.operator_build import _transposed_structure
    from snd.splat.upsample import upsample_weights

    V, H, W, h, w = 2, 23, 31, 4, 5
    J, G = V * h * w, V * H * W
    for seed in (0, 1):
        masks = torch.randint(0, 3, (V, H, W), generator=torch.Generator().manual_seed(seed))
        (y0, y1, x0, x1), wts = upsample_weights(masks, h, w, H, W, fallback="zero", grid=grid)
        ys, xs = torch.stack([y0, y0, y1, y1]), torch.stack([x0, x1, x0, x1])
        cols = (ys[:, :, None] * w + xs[:, None, :])[None] + (torch.arange(V) * h * w)[:, None, None, None]
        cols = cols.permute(0, 2, 3, 1).reshape(G, 4)
        vals = wts.permute(0, 2, 3, 1).reshape(G, 4).float()
        crow, col, slot = _transposed_structure(cols, J)
        got = torch.sparse_csr_tensor(crow, col, torch.zeros(col.numel()).index_add_(0, slot, vals.reshape(-1)), (J, G),
                                      check_invariants=True)  # a valid CSR: sorted columns per row, no repeats
        idx = torch.stack([cols.reshape(-1), torch.arange(G).repeat_interleave(4)])
        want = torch.sparse_coo_tensor(idx, vals.reshape(-1), (J, G), check_invariants=True).coalesce()
        assert torch.equal(got.to_dense(), want.to_dense())
        assert col.numel() == want._nnz() < 4 * G  # clamped border taps were merged


def test_dense_unique_equals_torch_unique():
    """The histogram version of `torch.unique(..., return_inverse=True)` used for a chunk's labels, with each unique
    value's count of flagged keys, and its fallback to the sort when the key range is too wide."""
    from snd.splat.operator_build import _dense_unique

    key = torch.tensor([7, 3, 3, 0, 11, 7, 7, 2])
    flag = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    for max_bins in (1 << 26, 4):  # histogram; the sort (2 x 12 bins > 4)
        u, inv, n = _dense_unique(key, 12, flag, max_bins=max_bins)
        assert u.tolist() == [0, 2, 3, 7, 11] and inv.tolist() == [3, 2, 2, 0, 4, 3, 3, 1]
        assert n.tolist() == [0, 0, 1, 2, 1]  # by hand: 0 and 2 unflagged, one 3 of two, two 7s of three, the 11
    g = torch.Generator().manual_seed(0)
    key = torch.randint(0, 5000, (20000,), generator=g)
    flag = torch.rand(20000, generator=g) < 0.3
    want = torch.unique(key, return_inverse=True)
    for max_bins in (1 << 26, 16):
        u, inv, n = _dense_unique(key, 5000, flag, max_bins=max_bins)
        assert torch.equal(u, want[0]) and torch.equal(inv, want[1])
        assert torch.equal(n, torch.stack([(flag & (key == v)).sum() for v in u]))


def test_label_slots_ignore_summation_noise():
    """Labels of equal blend mass get their slots by label, whatever the last bits of their summed masses
    (on a GPU, `index_add_` sums in no fixed order): the same slots for noise either way."""
    from snd.splat.operator_build import rank_score
    from snd.splat.operator_rows import _rank_in_group

    group = torch.tensor([0, 0, 0, 1, 1])
    for eps in (1e-13, -1e-13):
        mass = torch.tensor([0.7, 0.7 + eps, 0.9, 0.2 + eps, 0.2], dtype=torch.float64)
        o, rank = _rank_in_group(group, rank_score(mass))
        slot = torch.empty(5, dtype=torch.long)
        slot[o] = rank
        assert slot.tolist() == [1, 2, 0, 0, 1], eps
    o, rank = _rank_in_group(group, rank_score(torch.tensor([0.7, 0.7 + 1e-3, 0.9, 0.2, 0.3], dtype=torch.float64)))
    slot = torch.empty(5, dtype=torch.long)
    slot[o] = rank
    assert slot.tolist() == [2, 1, 0, 1, 0]  # real differences still rank by mass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_slot_kernel_and_gsplat_backward_give_the_same_operators(monkeypatch):
    """The instance part from snd's slot kernel (the default) == from gsplat's backward kernel on the dense field
    (SND_SLOT_ADJOINT=off), at the real size; every other field is the same bytes (the kernel changes nothing else)."""
    import snd.splat.kernels as sa
    dev = torch.device("cuda")
    args = _real_size_jobs(dev)
    got = {}
    for use in ("on", "off"):
        monkeypatch.setitem(sa.USE, "slot", use)
        got[use] = build_operators(*args, backend="gsplat", chunk=3)
        assert sa.USE["slot"] == use  # "on" built and ran the kernel (no fallback)
    assert got["on"].inst.abs().max() > 0
    for k, v in vars(got["off"]).items():
        if k == "inst":
            assert (got["on"].inst - v).norm() / v.norm() < 1e-5, k
        else:
            assert torch.equal(getattr(got["on"], k), v), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("out_hw,kw", [(OUT_HW, dict()), (OUT_HW, dict(row_cap=3, inst_cap=2)),
                                       (OUT_HW, dict(upsample="bilinear", blend_weight=1.0)), ((30, 40), dict())])
def test_direct_kernel_and_torch_glue_give_the_same_operators(scenes, out_hw, kw, monkeypatch):
    """The direct part from snd's direct-rows kernel (the default: per patch, its 4 tap pixels walked and summed in
    a table) == from gsplat's list aggregated in torch (SND_DIRECT_KERNEL=off): the kept coefficients, the row
    counts and the dropped shares, with the caps binding (row_cap=3), with nothing left unblended (blend_weight 1),
    and for patches that share tap pixels (30x40 from 48x64); the other fields are the same bytes."""
    import snd.splat.kernels as sa

    dev = torch.device("cuda")
    args = ([s["g"].to(device=dev) for s in scenes], torch.stack([s["masks"][:2] for s in scenes]).to(dev),
            torch.stack([scenes[p]["masks"][c] for p, c in JOBS]).to(dev),
            torch.stack([scenes[p]["K"][c] for p, c in JOBS]).to(dev),
            torch.stack([scenes[p]["w2c"][c] for p, c in JOBS]).to(dev),
            torch.tensor([p for p, _ in JOBS], device=dev), CTX_HW, out_hw)
    got = {}
    for use in ("on", "off"):
        monkeypatch.setitem(sa.USE, "direct", use)
        got[use] = build_operators(*args, chunk=2, backend="gsplat", **kw)
        assert sa.USE["direct"] == use  # "on" built and ran the kernel (no fallback)
    on, off = got["on"], got["off"]
    J = 2 * CTX_HW[0] * CTX_HW[1]
    for n in range(len(JOBS)):
        a = TransferOperator(**{k: v[n].cpu() for k, v in vars(on).items()})
        b = TransferOperator(**{k: v[n].cpu() for k, v in vars(off).items()})
        torch.testing.assert_close(_dense(a, J), _dense(b, J), atol=1e-7, rtol=1e-6)
    assert torch.equal(on.max_row_nnz, off.max_row_nnz)
    torch.testing.assert_close(on.dropped_direct, off.dropped_direct, atol=1e-6, rtol=1e-5)
    if kw.get("blend_weight") == 1.0:  # fully blended: no direct coefficient at all, from either path
        assert off.vals.abs().max() == 0 and on.vals.abs().max() == 0
    else:
        assert off.vals.abs().max() > 0.05
    if "row_cap" in kw:
        assert (off.dropped_direct > 0).all()
    # the instance part comes from atomic adds (gsplat's backward or snd's slot kernel): equal up to their order
    assert (on.inst - off.inst).norm() <= 1e-5 * off.inst.norm()
    for k in ("inst_ids", "inst_w", "valid", "dropped_inst"):
        assert torch.equal(getattr(on, k), getattr(off, k)), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_direct_kernel_at_the_real_size_and_a_table_too_small(monkeypatch):
    """At 576x880 (synthetic pairs, 3 jobs) the kernel's operators == the torch glue's; and with tables of 8 slots,
    rows that overflow are rebuilt with the next size and give the same operators."""
    import snd.splat.kernels as sa
    dev = torch.device("cuda")
    args = _real_size_jobs(dev)
    got = {}
    for name, use, cap in (("glue", "off", None), ("kernel", "on", None), ("small", "on", (8, 2048))):
        monkeypatch.setitem(sa.USE, "direct", use)
        if cap:
            monkeypatch.setattr(sa, "DIRECT_CAPACITY", cap)
        got[name] = build_operators(*args, backend="gsplat", chunk=3)
    ref = got["glue"]
    feats = torch.randn(3, 2, 32, 41, 62, device=dev)
    y, vy = apply_operator(ref, feats, (41, 62))
    assert ref.vals.abs().max() > 0 and int(ref.max_row_nnz.max()) > 8
    for name in ("kernel", "small"):
        op = got[name]
        x, vx = apply_operator(op, feats, (41, 62))
        assert torch.equal(vx, vy) and (x - y).norm() / y.norm() < 1e-6, name
        assert torch.equal(op.max_row_nnz, ref.max_row_nnz), name
        assert (op.cols == ref.cols).float().mean() > 0.999, name
        torch.testing.assert_close(op.dropped_direct, ref.dropped_direct, atol=1e-6, rtol=1e-5)


def test_transposed_structure_is_cached_per_grid(scenes, monkeypatch):
    """The builder keeps the transposed taps' structure of the grids it saw: a second call with the same grids
    reuses it (no new sort), one with the other sampling grid builds its own, and the operators equal those
    built with the cache empty."""
    import snd.splat.operator_build as ob

    monkeypatch.setattr(ob, "_STRUCTURES", {})
    built = []
    real = ob._transposed_structure
    monkeypatch.setattr(ob, "_transposed_structure", lambda cols, J: built.append(J) or real(cols, J))
    first = _build(scenes, chunk=2)
    again = _build(scenes, chunk=2)
    assert len(built) == 1 and len(ob._STRUCTURES) == 1
    other = _build(scenes, chunk=2, protocol="snd")  # the centres grid: other patch columns per pixel
    assert len(built) == 2 and len(ob._STRUCTURES) == 2
    ob._STRUCTURES.clear()
    fresh = _build(scenes, chunk=2, protocol="snd")
    for k, v in vars(first).items():
        assert torch.equal(v, getattr(again, k)), k
        assert torch.equal(getattr(other, k), getattr(fresh, k)), k


def _real_size_jobs(dev: torch.device) -> tuple:
    """`build_operators`' arguments for 3 jobs over 2 synthetic 576x880 pairs at the 41x62 grid, on `dev`."""
    from snd.splat.gaussians import PixelGaussians
    from snd.train.distiller import rigid_inverse
    from snd.train.synthetic import synthetic_sample

    xs = [synthetic_sample(i, img_hw=(574, 868), scaffold_hw=(576, 880)) for i in range(2)]
    gs = [PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"]).to(device=dev) for x in xs]
    masks = torch.stack([x["ctx_masks"] for x in xs]).to(dev)
    src, pair = [1, 0, 0], torch.tensor([0, 1, 0], device=dev)
    return (gs, masks, torch.stack([xs[i]["tgt_mask"] for i in src]).to(dev),
            torch.stack([xs[i]["tgt_K"] for i in src]).to(dev),
            torch.stack([rigid_inverse(xs[i]["tgt_c2w"]) for i in src]).to(dev), pair, (41, 62), (41, 62))


def test_job_index_is_a_slice_for_consecutive_jobs_and_indexes_alike():
    """`_assemble` indexes a pair's jobs by a slice when they are consecutive (no blocking copy of a list to the GPU)."""
    from snd.splat.operator_build import _job_index

    x = torch.arange(24.0).reshape(6, 4)
    assert _job_index([2, 3, 4], x.device) == slice(2, 5)
    for jobs in ([2, 3, 4], [0, 2, 5], [4]):
        torch.testing.assert_close(x[_job_index(jobs, x.device)], x[jobs])
    assert isinstance(_job_index([0, 2], x.device), torch.Tensor)
