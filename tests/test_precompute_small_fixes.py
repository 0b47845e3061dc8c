"""Stage one's small defaults: `--operator-chunk 0`, `--operator-workers 0` and `--batch-pairs 0` (auto) resolved per
device, and
`rigid_inverse` on batches."""
import pytest
import torch

from snd.errors import SndError
from snd.pipeline.config import BenchPrecomputeConfig, PrecomputeConfig
from snd.stages.precompute.settings import resolve_batch_pairs, resolve_operator_chunk, resolve_operator_workers
from snd.train.distiller import rigid_inverse


def test_operator_chunk_auto_is_8_on_cuda_and_1_on_cpu():
    assert PrecomputeConfig().operator_chunk == 0 and BenchPrecomputeConfig().operator_chunk == 0  # auto by default
    assert resolve_operator_chunk(0, "cuda") == 24 and resolve_operator_chunk(0, torch.device("cuda", 1)) == 24
    assert resolve_operator_chunk(0, "cpu") == 1 and resolve_operator_chunk(0, torch.device("cpu")) == 1
    assert resolve_operator_chunk(3, "cpu") == 3 and resolve_operator_chunk(12, "cuda") == 12  # a given chunk is kept
    with pytest.raises(SndError, match="operator-chunk"):
        resolve_operator_chunk(-1, "cpu")


def test_operator_workers_auto_is_2_on_cuda_and_1_on_cpu():
    assert PrecomputeConfig().operator_workers == 0 and BenchPrecomputeConfig().operator_workers == 0  # auto by default
    assert resolve_operator_workers(0, "cuda") == 2 and resolve_operator_workers(0, torch.device("cuda", 1)) == 2
    assert resolve_operator_workers(0, "cpu") == 1 and resolve_operator_workers(3, "cpu") == 3
    with pytest.raises(SndError, match=r"--operator-workers must be >= 1, or 0 for auto \(2 on CUDA, 1 on CPU\), got -2"):
        resolve_operator_workers(-2, "cuda")


def test_precompute_refuses_a_negative_chunk_before_any_work(tmp_path):
    """Checked before the dataset is opened (this root does not exist: a later check would name it instead)."""
    from snd.stages.precompute import run

    with pytest.raises(SndError, match=r"--operator-chunk must be >= 1, or 0 for auto \(24 on CUDA, 1 on CPU\), got -1"):
        run(PrecomputeConfig(data=tmp_path / "missing", out=tmp_path / "out", operator_chunk=-1), progress=False)
    assert not (tmp_path / "out").exists()


def test_batch_pairs_auto_is_8_on_cuda_and_1_on_cpu():
    assert PrecomputeConfig().batch_pairs == 0 and BenchPrecomputeConfig().batch_pairs == 0  # auto by default
    assert resolve_batch_pairs(0, "cuda") == 8 and resolve_batch_pairs(0, torch.device("cuda", 1)) == 8
    assert resolve_batch_pairs(0, "cpu") == 1
    assert resolve_batch_pairs(0, "auto") == (8 if torch.cuda.is_available() else 1)
    assert resolve_batch_pairs(4, "cpu") == 4 and resolve_batch_pairs(2, "cuda") == 2  # a given size is kept
    with pytest.raises(SndError, match="batch-pairs"):
        resolve_batch_pairs(-1, "cpu")


def test_bench_precompute_records_the_batch_it_used(tmp_path):
    from snd.bench.precompute import bench

    r = bench(BenchPrecomputeConfig(source="depth", height=56, width=84, pairs=2, device="cpu", images="off",
                                    workdir=tmp_path, out=tmp_path / "b.json"))
    assert r["batch_pairs"] == 1 and r["operator_chunk"] == 1  # auto on CPU, as used


def test_bench_precompute_records_a_chunk_shrunk_by_gpu_memory(tmp_path, monkeypatch):
    """`--operator-chunk 3` whose chunks do not fit (simulated OOM above one target): the run completes and the
    JSON says which chunk was asked for and which one was used."""
    import snd.splat.operator_build as ob
    from snd.bench.precompute import bench

    real = ob.contributions

    def tight(gaussians, pair, *a, **k):
        if pair.numel() > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(gaussians, pair, *a, **k)

    monkeypatch.setattr(ob, "contributions", tight)
    r = bench(BenchPrecomputeConfig(source="depth", height=56, width=84, pairs=2, device="cpu", images="off",
                                    operator_chunk=3, workdir=tmp_path, out=tmp_path / "b.json"))
    assert (r["operator_chunk_asked"], r["operator_chunk"]) == (3, 1) and r["pairs_total"] >= 2


def _random_rigid(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(*shape, 3, 3, generator=g, dtype=torch.float64))
    R = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]  # a Haar-random orthonormal basis
    R = R * torch.sign(torch.linalg.det(R))[..., None, None]  # det +1: a rotation (flip all columns when -1)
    T = torch.zeros(*shape, 4, 4, dtype=torch.float64)
    T[..., :3, :3], T[..., :3, 3], T[..., 3, 3] = R, 10 * torch.randn(*shape, 3, generator=g, dtype=torch.float64), 1
    return T


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (0,)])
def test_rigid_inverse_batched_equals_linalg_inv(shape):
    T = _random_rigid(shape)
    inv = rigid_inverse(T)
    assert inv.shape == T.shape and inv.dtype == T.dtype
    assert torch.allclose(inv, torch.linalg.inv(T), atol=1e-12)
    assert torch.allclose(inv @ T, torch.eye(4, dtype=T.dtype).expand_as(T), atol=1e-12)
    if T.shape[0]:  # each batch entry is the single-matrix result
        flat, flat_inv = T.reshape(-1, 4, 4), inv.reshape(-1, 4, 4)
        for i in range(flat.shape[0]):
            assert torch.equal(rigid_inverse(flat[i]), flat_inv[i])
    f32 = rigid_inverse(T.float())
    assert f32.dtype == torch.float32 and torch.allclose(f32, torch.linalg.inv(T).float(), atol=1e-5)


def test_rigid_inverse_rejects_other_shapes():
    with pytest.raises(AssertionError, match="4, 4"):
        rigid_inverse(torch.eye(3))
