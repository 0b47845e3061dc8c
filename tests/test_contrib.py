"""`snd.splat.contrib.contributions`: the list at chosen pixels is the full list cut to those pixels, and
the adjoint is the transpose of the render (checked against the full list summed by hand, and against
<render(f), Y> = <f, adjoint(Y)> for random f, which holds for the transpose and nothing else)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from snd.splat.contrib import SlotField, contributions
from snd.splat.from_depth import gaussians_from_depth
from tests.test_splat_target import _planes_scene

EYES = [(-0.35, -1.0, 1.3), (0.35, -1.0, 1.3), (0.0, -2.2, 1.6), (0.1, -1.6, 1.2)]


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def _scene(device="cpu"):
    cams, depth, _ = _planes_scene(EYES)
    K = torch.stack([_t(c.K) for c in cams])
    g = gaussians_from_depth(_t(depth[:2]), K[:2], torch.stack([_t(c.c2w) for c in cams[:2]]), scale_mult=0.7,
                             opacity=0.9)
    w2c = torch.stack([_t(c.w2c) for c in cams])
    H, W = depth.shape[1:]
    return g.to(device=device), K[2:].to(device), w2c[2:].to(device), int(H), int(W)


def _by_hand_adjoint(c, Y, G):
    """sum_q w_qg Y[n, q] from the full list, in float64."""
    N, H, W, K = Y.shape
    out = torch.zeros(N * G, K, dtype=torch.float64, device=Y.device)
    out.index_add_(0, c.job * G + c.gauss, c.weight[:, None] * Y.reshape(N, H * W, K)[c.job, c.pix].double())
    return out.reshape(N, G, K)


def _check(backend, device, rtol):
    """rtol: of the adjoint against the float64 list (gsplat's backward recomputes T by division in float32:
    2.4e-4 measured on an H100; the torch plan's weights are the list's own)."""
    g, K, w2c, H, W = _scene(device)
    pair = torch.zeros(2, dtype=torch.long, device=device)
    G = g.means[..., 0].numel()
    gen = torch.Generator(device="cpu").manual_seed(0)
    Y = torch.rand(2, H, W, 3, generator=gen).to(device)
    pixels = (torch.rand(H * W, generator=gen) < 0.1).to(device)
    seen = []

    def field(alpha):
        seen.append(alpha)
        return Y

    full = contributions([g], pair, K, w2c, H, W, backend=backend)
    cut = contributions([g], pair, K, w2c, H, W, backend=backend, pixels=pixels, adjoint=field)
    # the list at chosen pixels == the full list's entries there, in the same order, with the same weights
    at = pixels[full.pix]
    assert 0 < int(at.sum()) < full.pix.numel()
    for k in ("job", "pix", "gauss"):
        assert torch.equal(getattr(cut, k), getattr(full, k)[at]), k
    # float64 transmittance from a cumulative sum over the whole list: a shorter list rounds differently (~1e-11)
    torch.testing.assert_close(cut.weight, full.weight[at], rtol=1e-9, atol=0)
    torch.testing.assert_close(cut.alpha, full.alpha, rtol=0, atol=1e-5)  # gsplat: float32 forward vs float64
    assert len(seen) == 1 and seen[0].shape == (2, H, W)
    # the adjoint == the full list summed by hand
    ref = _by_hand_adjoint(full, Y, G)
    assert cut.adjoint.shape == (2, G, 3) and ref.abs().max() > 0.1
    torch.testing.assert_close(cut.adjoint.double(), ref, rtol=rtol, atol=rtol / 10)
    # and it is the render's transpose: <R f, Y> == <f, R^T Y> for random Gaussian features f
    f = torch.randn(G, 3, generator=gen).double().to(device)
    img = torch.zeros(2 * H * W, 3, dtype=torch.float64, device=device)
    img.index_add_(0, full.job * H * W + full.pix, full.weight[:, None] * f[full.gauss])
    lhs = (img * Y.reshape(-1, 3).double()).sum()
    rhs = (cut.adjoint.double() * f[None]).sum()
    torch.testing.assert_close(rhs, lhs, rtol=rtol, atol=1e-6)


def test_pixels_and_adjoint_torch():
    _check("torch", "cpu", rtol=1e-4)


def test_an_empty_field_gives_an_empty_adjoint():
    g, K, w2c, H, W = _scene()
    c = contributions([g], torch.zeros(2, dtype=torch.long), K, w2c, H, W, backend="torch",
                      adjoint=lambda a: torch.zeros(*a.shape, 0))
    assert c.adjoint.shape == (2, g.means[..., 0].numel(), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pixels_and_adjoint_gsplat():
    """gsplat's index rasteriser started at T=0 off the chosen pixels, and its backward kernel as the adjoint."""
    pytest.importorskip("gsplat")
    _check("gsplat", "cuda", rtol=1e-3)


def _slot_field(N, H, W, K, seed=0):
    """A field with one channel per pixel in labelled blocks (as the builder's label selectors are), a few pixels
    in no slot."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    slot = ((ys // 7) * 3 + xs // 9) % K
    slot = torch.stack([(slot + n) % K for n in range(N)])
    slot[torch.rand(N, H, W, generator=gen) < 0.1] = -1
    value = torch.where(slot >= 0, torch.rand(N, H, W, generator=gen) + 0.5, torch.zeros(()))
    return SlotField(slot, value, K)


def test_slot_field_dense_by_hand():
    f = SlotField(torch.tensor([[[0, -1], [2, 2]]]), torch.tensor([[[0.5, 9.0], [1.5, 2.5]]]), 3)
    Y = f.dense()
    assert Y.shape == (1, 2, 2, 3)
    assert Y[0].reshape(4, 3).tolist() == [[0.5, 0, 0], [0, 0, 0], [0, 0, 1.5], [0, 0, 2.5]]


def test_torch_backend_takes_a_slot_field():
    """The torch plan's adjoint of a SlotField == that of its dense field (the builder hands a SlotField)."""
    g, K, w2c, H, W = _scene()
    pair = torch.zeros(2, dtype=torch.long)
    f = _slot_field(2, H, W, 5)
    a = contributions([g], pair, K, w2c, H, W, backend="torch", adjoint=lambda al: f).adjoint
    b = contributions([g], pair, K, w2c, H, W, backend="torch", adjoint=lambda al: f.dense()).adjoint
    assert a.abs().max() > 0.1 and torch.equal(a, b)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (no GPU needed to build)")
def test_slot_kernel_builds_with_nvcc_and_a_broken_source_is_a_clear_error(tmp_path, monkeypatch):
    """The CUDA source compiles (for sm_90, on any machine with nvcc) to a library exporting the entry point the
    loader calls; a source nvcc rejects raises KernelUnavailable with nvcc's message, and leaves no file."""
    import ctypes

    from snd.splat import kernels as sa

    out = sa.library_path((9, 0), tmp_path)
    sa._build(out, (9, 0))
    assert out.is_file() and all(hasattr(ctypes.CDLL(str(out)), f) for f in ("snd_slot_adjoint", "snd_direct_rows"))
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k( { }\n")
    monkeypatch.setattr(sa, "SOURCE", bad)
    target = sa.library_path((9, 0), tmp_path)
    assert target != out  # named by the source's hash: an edited source is rebuilt
    with pytest.raises(sa.KernelUnavailable, match="nvcc failed"):
        sa._build(target, (9, 0))
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [out.name]


def test_no_nvcc_is_a_clear_error(tmp_path, monkeypatch):
    from snd.pipeline import doctor
    from snd.splat import kernels as sa

    if shutil.which("nvcc"):  # an unwritable cache folder is the same kind of error (a file where the folder should be)
        (tmp_path / "ro").write_text("")
        with pytest.raises(sa.KernelUnavailable, match="cannot write to"):
            sa._build(tmp_path / "ro" / "kernels" / "k.so", (9, 0))
    monkeypatch.setattr(sa, "_nvcc", lambda: None)
    with pytest.raises(sa.KernelUnavailable, match="nvcc not found"):
        sa._build(sa.library_path((9, 0), tmp_path), (9, 0))
    monkeypatch.setattr(sa.torch.cuda, "is_available", lambda: True)  # what `snd doctor` says on a GPU machine
    monkeypatch.setattr(sa.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert "nvcc not found: operators use gsplat's backward kernel" in doctor.report(tmp_path)["operator_kernels"]
    monkeypatch.setenv("SND_CACHE_DIR", str(tmp_path / "cache"))
    sa.library_path((9, 0)).parent.mkdir(parents=True)
    sa.library_path((9, 0)).write_bytes(b"")
    monkeypatch.delenv("SND_SLOT_ADJOINT", raising=False)
    monkeypatch.delenv("SND_DIRECT_KERNEL", raising=False)
    assert sa.status() == f"on: slot adjoint and direct rows; built for this GPU (in {sa.library_path((9, 0)).parent})"
    monkeypatch.setenv("SND_DIRECT_KERNEL", "off")
    assert sa.status().startswith("off: direct (SND_DIRECT_KERNEL=off) (gsplat's backward kernel / the torch "
                                  "aggregation instead); built for this GPU")
    monkeypatch.setenv("SND_SLOT_ADJOINT", "off")
    assert sa.status().startswith("off: slot (SND_SLOT_ADJOINT=off), direct (SND_DIRECT_KERNEL=off)")
    monkeypatch.setitem(sa.USE, "slot", "on")  # code's setting wins over the variable
    assert sa.enabled("slot") and not sa.enabled("direct")
    for value, on in (("0", False), ("False", False), ("no", False), ("1", True), ("on", True)):
        monkeypatch.setenv("SND_DIRECT_KERNEL", value)
        assert sa.enabled("direct") is on, value


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["on", "off"])
def test_slot_adjoint_gsplat_equals_the_list(kernel, monkeypatch):
    """snd's slot kernel ("on") and gsplat's backward kernel on the dense field ("off") both give the adjoint of
    a one-channel-per-pixel field == the full list summed by hand (float64)."""
    pytest.importorskip("gsplat")
    import snd.splat.kernels as sa

    monkeypatch.setitem(sa.USE, "slot", kernel)
    g, K, w2c, H, W = _scene("cuda")
    pair = torch.zeros(2, dtype=torch.long, device="cuda")
    G = g.means[..., 0].numel()
    f = _slot_field(2, H, W, 5)
    f = SlotField(f.slot.cuda(), f.value.cuda(), f.channels)
    full = contributions([g], pair, K, w2c, H, W, backend="gsplat")
    cut = contributions([g], pair, K, w2c, H, W, backend="gsplat", adjoint=lambda a: f)
    ref = _by_hand_adjoint(full, f.dense(), G)
    assert cut.adjoint.shape == (2, G, 5) and ref.abs().max() > 0.1
    torch.testing.assert_close(cut.adjoint.double(), ref, rtol=1e-3, atol=1e-4)
    assert sa.USE["slot"] == kernel  # "on" did not fall back


def test_direct_table_sizes_fit_the_gpus_shared_memory(monkeypatch):
    """The direct-rows kernel's larger table (8,192 slots, 192 KiB) is tried only where a block may hold it: on an
    H100 (227 KiB per block) both sizes, on an A100 (163 KiB) the first only (a row past it goes to the torch path
    instead of a failed launch)."""
    from types import SimpleNamespace

    from snd.splat import kernels as sa

    for optin, want in ((232448, [2048, 8192]), (166912, [2048]), (0, [])):
        props = SimpleNamespace(shared_memory_per_block_optin=optin, shared_memory_per_block=49152 if optin else 0)
        monkeypatch.setattr(sa.torch.cuda, "get_device_properties", lambda *a, p=props: p)
        assert sa._capacities(None) == want, optin


def test_direct_kernel_that_cannot_build_falls_back_once_with_a_warning(monkeypatch, caplog):
    """When snd's direct-rows kernel cannot build (no nvcc, a failed build), `contrib` returns None so that the list
    is made and aggregated in torch, turns the kernel off for the process (no second attempt) and says so once."""
    from snd.splat import contrib
    from snd.splat import kernels as sa

    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise sa.KernelUnavailable("nvcc not found")

    monkeypatch.setattr(sa, "direct_rows", broken)
    monkeypatch.setitem(sa.USE, "direct", None)
    assert sa.enabled("direct")
    ras = (8, 8, 16, torch.zeros(1, 1, 1, 1), torch.zeros(0))
    with caplog.at_level("WARNING", logger="snd.splat.kernels"):
        assert contrib._direct_kernel({}, (None, None), None, ras) is None
    assert calls == [1] and not sa.enabled("direct") and sa.USE["direct"] == "off"
    assert [r.getMessage() for r in caplog.records] == [
        "snd's direct kernel is unavailable (nvcc not found); aggregating gsplat's list in torch (the same operators)"]
