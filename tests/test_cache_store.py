"""Scaffold store on synthetic arrays: quantisation round trip, writer/reader, manifest, corruption."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from snd.cache import manifest as M
from snd.cache.encode import decode_means_reference, decode_scaffold, encode_scaffold, quat_conj
from snd.cache.reader import CacheReader
from snd.cache.schema import Encoding, delta_decode, delta_encode, layout
from snd.cache.writer import SceneWriter
from snd.data.camera import intrinsics, look_at
from snd.errors import SndError
from snd.splat.gaussians import quat_multiply


def random_scaffold(B: int, H: int, W: int, *, seed: int, offsets: bool = True):
    """Pixel-aligned Gaussians in front of two cameras per pair (MVSplat-like: offsets, anisotropy)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor(intrinsics(0.9 * W, 0.95 * W, (W - 1) / 2 + 1.3, (H - 1) / 2 - 0.7))
    Ks = K.expand(B, 2, 3, 3).clone()
    c2w = torch.zeros(B, 2, 4, 4, dtype=torch.float64)
    for b in range(B):
        for v in range(2):
            eye = torch.randn(3, generator=g, dtype=torch.float64) * 2
            c2w[b, v] = torch.from_numpy(look_at(eye.numpy(), np.array([0.3, 0.2, 0.1]) + 5.0))
    z = 1.0 + 4.0 * torch.rand(B, 2, H, W, generator=g, dtype=torch.float64)
    off = (torch.rand(B, 2, H, W, 2, generator=g, dtype=torch.float64) - 0.5) if offsets else torch.zeros(B, 2, H, W, 2, dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    uv1 = torch.stack([u + off[..., 0], v + off[..., 1], torch.ones_like(off[..., 0])], -1)
    d = torch.einsum("ij,bvhwj->bvhwi", torch.linalg.inv(K), uv1) * z[..., None]
    means = torch.einsum("bvij,bvhwj->bvhwi", c2w[..., :3, :3], d) + c2w[:, :, None, None, :3, 3]
    quats = torch.randn(B, 2, H, W, 4, generator=g)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    foot = (z / (K[0, 0] * K[1, 1]).sqrt())[..., None]
    scales = (foot * torch.exp(torch.randn(B, 2, H, W, 3, generator=g, dtype=torch.float64))).float()
    opac = torch.rand(B, 2, H, W, generator=g) * 0.98 + 0.01
    return means.float(), quats, scales, opac, Ks, c2w, z


def test_delta_filter_round_trip_wraps():
    rng = np.random.default_rng(0)
    for dt in (np.int8, np.uint8, np.int16, np.uint16):
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=(3, 4, 37), endpoint=True).astype(dt)
        d = delta_encode(a)
        assert d.dtype == dt
        np.testing.assert_array_equal(delta_decode(d), a)
    smooth = np.arange(50, dtype=np.uint8)[None].repeat(2, 0)
    assert set(np.unique(delta_encode(smooth)[:, 1:])) == {1}
    # uint8 decodes through torch (speed): equal to numpy's wrapping cumsum, also for a strided view
    frame = rng.integers(0, 255, size=(3, 574, 868), endpoint=True).astype(np.uint8)
    for d in (delta_encode(frame), delta_encode(frame)[:, ::3, 1:]):
        got = delta_decode(d)
        assert got.dtype == np.uint8 and got.flags.writeable
        np.testing.assert_array_equal(got, np.cumsum(d, axis=-1, dtype=np.uint8))


@pytest.mark.parametrize("offsets", [True, False])
def test_encode_decode_within_stated_tolerances(offsets):
    B, H, W = 2, 12, 17
    means, quats, scales, opac, K, c2w, z = random_scaffold(B, H, W, seed=1, offsets=offsets)
    enc = Encoding(offset=offsets)
    fields = encode_scaffold(means, quats, scales, opac, K, c2w, enc=enc)
    m2, q2, s2, o2 = decode_scaffold(fields, K, c2w, enc=enc)
    # means: depth float16 (<= 2^-11 relative) + offsets at range/254 px
    dist = (means.double() - c2w[:, :, None, None, :3, 3]).norm(dim=-1)  # range along the ray
    err = (m2.double() - means.double()).norm(dim=-1) / dist
    assert err.max() < (1e-3 if offsets else 2.0 ** -11 + 1e-6), err.max()
    # rotations: angle between q and q2 (sign-free) below 1 degree for int8
    dot = (q2.double() * quats.double()).sum(-1).abs().clamp(max=1)
    assert torch.rad2deg(2 * torch.acos(dot)).max() < 1.0
    # scales: uint8 over the per-view log2 range -> relative error <= 2^(range/510) - 1
    rng = torch.from_numpy(fields["scale_range"]).double()
    bound = torch.exp2((rng[..., 1] - rng[..., 0]) / 510)[:, :, None, None, None] - 1
    rel = (s2.double() / scales.double() - 1).abs()
    assert (rel <= bound * 1.01 + 1e-6).all(), (rel.max(), bound.max())
    assert (o2 - opac).abs().max() <= 0.5 / 255 + 1e-6


def test_decode_means_matches_slow_reference():
    means, quats, scales, opac, K, c2w, z = random_scaffold(1, 6, 9, seed=2)
    enc = Encoding(offset=True)
    f = encode_scaffold(means, quats, scales, opac, K, c2w, enc=enc)
    m2, *_ = decode_scaffold(f, K, c2w, enc=enc)
    for v in range(2):
        off = f["offset"][0, v].transpose(1, 2, 0).astype(np.float64) / 127 * np.float64(f["offset_range"][0, v])
        ref = decode_means_reference(f["depth"][0, v].astype(np.float64), off, K[0, v].numpy(), c2w[0, v].numpy())
        np.testing.assert_allclose(m2[0, v].numpy(), ref, rtol=0, atol=2e-5)


def test_quat_frame_change_is_exact():
    q = torch.randn(5, 4, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    r = torch.randn(5, 4, dtype=torch.float64)
    r = r / r.norm(dim=-1, keepdim=True)
    back = quat_multiply(r, quat_multiply(quat_conj(r), q))
    torch.testing.assert_close(back, q)


def test_invalid_pixels_decode_to_camera_centre_with_zero_opacity():
    means, quats, scales, opac, K, c2w, z = random_scaffold(1, 5, 6, seed=3, offsets=False)
    means[0, 0, 1, 2] = c2w[0, 0, :3, 3].float()  # depth source convention for invalid depth
    opac[0, 0, 1, 2] = 0.0
    enc = Encoding()
    m2, _, _, o2 = decode_scaffold(encode_scaffold(means, quats, scales, opac, K, c2w, enc=enc), K, c2w, enc=enc)
    assert o2[0, 0, 1, 2] == 0
    torch.testing.assert_close(m2[0, 0, 1, 2], c2w[0, 0, :3, 3].float())


# -- writer / reader ---------------------------------------------------------------------------------
def batch_fields(B: int, H: int, W: int, T: int, *, seed: int, enc: Encoding) -> dict[str, np.ndarray]:
    means, quats, scales, opac, K, c2w, _ = random_scaffold(B, H, W, seed=seed, offsets=enc.offset)
    f = encode_scaffold(means, quats, scales, opac, K, c2w, enc=enc)
    rng = np.random.default_rng(seed)
    f["ctx_mask"] = rng.integers(0, 5, size=(B, 2, H, W)).astype(np.int32)
    f["tgt_mask"] = rng.integers(0, 5, size=(B, T, H, W)).astype(np.int32)
    f["ctx_index"] = rng.integers(0, 9, size=(B, 2)).astype(np.int32)
    f["tgt_index"] = rng.integers(0, 9, size=(B, T)).astype(np.int32)
    f["ctx_K"], f["ctx_c2w"] = K.numpy(), c2w.numpy()
    f["tgt_K"] = np.repeat(K.numpy()[:, :1], T, 1)
    f["tgt_c2w"] = np.repeat(c2w.numpy()[:, 1:], T, 1)
    return f


def write_scene(root: Path, scene: str, P: int, *, H=8, W=11, T=2, enc=Encoding(offset=True), seed=0, pps=2):
    M.init_store(root, {"dataset": {"root": "x"}, "source": {"name": "test"}, "scaffold": [H, W],
                        "sampler": {}, "encoding": enc.to_dict()})
    w = SceneWriter(root, scene, n_pairs=P, n_targets=T, height=H, width=W, enc=enc,
                    attrs={"frame_ids": [f"f{i}" for i in range(9)]}, pairs_per_shard=pps)
    batches = []
    done = 0
    while done < P:
        b = min(3, P - done)
        f = batch_fields(b, H, W, T, seed=seed + done, enc=enc)
        w.add(f)
        batches.append(f)
        done += b
    M.write_marker(root, scene, w.commit())
    return {k: np.concatenate([f[k] for f in batches]) for k in batches[0]}


def test_writer_reader_round_trip(tmp_path):
    enc = Encoding(offset=True)
    ref = write_scene(tmp_path, "sceneA", 5, enc=enc)
    r = CacheReader(tmp_path)
    assert r.scenes == ["sceneA"]
    s = r.scene("sceneA")
    assert s.n_pairs == 5 and s.frame_ids[3] == "f3"
    for p in range(5):
        st = s.read_stored(p)
        for k in layout(8, 11, 2, enc):
            np.testing.assert_array_equal(st[k], ref[k][p], err_msg=k)
        d = s.pair(p)
        K, c2w = torch.from_numpy(ref["ctx_K"][p:p + 1]), torch.from_numpy(ref["ctx_c2w"][p:p + 1])
        m, q, sc, o = decode_scaffold({k: v[p:p + 1] for k, v in ref.items()}, K, c2w, enc=enc)
        torch.testing.assert_close(d.means, m[0])
        torch.testing.assert_close(d.quats, q[0])
        assert d.ctx_masks.dtype == torch.int64 and d.tgt_masks.shape == (2, 8, 11)
    man = M.merge_manifest(tmp_path)
    assert man["scenes"]["sceneA"]["pairs"] == 5 and man["totals"]["items"] == 10
    assert (tmp_path / "manifest.json").exists()
    assert not any((M.tmp_dir(tmp_path)).iterdir())


def test_a_store_written_through_zarrs_reads_back_the_same(tmp_path):
    """zarrs-python's codec pipeline (an option the benchmarks time for the writer, `scripts/writer_rates.py`) writes
    shards that zarr's own pipeline reads back to the same stored values and checksums."""
    pytest.importorskip("zarrs")
    import zarr

    enc = Encoding(offset=True)
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        ref = write_scene(tmp_path, "sceneA", 5, enc=enc)
    s = CacheReader(tmp_path).scene("sceneA")  # zarr's own pipeline from here
    for p in range(5):
        st = s.read_stored(p)  # checks each pair's crc32c against the table
        for k in layout(8, 11, 2, enc):
            np.testing.assert_array_equal(st[k], ref[k][p], err_msg=k)


def test_unmarked_scene_is_not_complete(tmp_path):
    write_scene(tmp_path, "s0", 2)
    (M.markers_dir(tmp_path) / "s0.json").unlink()
    assert CacheReader(tmp_path).scenes == []
    assert M.complete_record(tmp_path, "s0") is None


def test_store_refuses_other_settings(tmp_path):
    write_scene(tmp_path, "s0", 1)
    with pytest.raises(SndError, match="different settings"):
        M.init_store(tmp_path, {"dataset": {"root": "y"}, "source": {"name": "test"}, "scaffold": [8, 11],
                                "sampler": {}, "encoding": Encoding(offset=True).to_dict()})


def test_garbled_header_names_its_restore(tmp_path):
    """A garbled header.json was told 'delete this file (the scene is then redone)', which makes the folder no
    store at all; the copy in manifest.json restores it. A header that is JSON but no object was an AttributeError."""
    import json

    write_scene(tmp_path, "s0", 2)
    M.merge_manifest(tmp_path)
    hpath = M.meta_dir(tmp_path) / "header.json"
    for garbled in ('{"format": ', "[]"):
        hpath.write_text(garbled)
        with pytest.raises(SndError, match="header.json") as e:
            CacheReader(tmp_path)
        assert "manifest.json" in str(e.value) and "scene is then redone" not in str(e.value)
    man = json.loads((tmp_path / "manifest.json").read_text())
    hpath.write_text(json.dumps({k: v for k, v in man.items() if k not in ("scenes", "totals")}))
    assert CacheReader(tmp_path).scenes == ["s0"]


@pytest.mark.parametrize("array", ["quats", "depth", "tgt_mask"])
def test_corrupted_chunk_names_scene_and_pair(tmp_path, array):
    write_scene(tmp_path, "sceneB", 5, pps=2)
    # the second shard file (pairs 2 and 3): chunk keys are c/<shard>/0/...
    shard = next(p for p in (tmp_path / "sceneB" / array).rglob("*") if p.is_file() and p.name != "zarr.json"
                 and p.relative_to(tmp_path / "sceneB" / array).parts[1] == "1")
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first chunk of that shard = pair 2
    shard.write_bytes(bytes(data))
    r = CacheReader(tmp_path).scene("sceneB")
    r.read_stored(0)
    with pytest.raises(SndError, match=r"scene 'sceneB' pair 2"):
        r.read_stored(2)
    with pytest.raises(SndError, match="corrupted"):
        CacheReader(tmp_path).verify_all()


def test_crc_table_tamper_detected(tmp_path):
    write_scene(tmp_path, "s1", 2)
    rec_path = M.markers_dir(tmp_path) / "s1.json"
    import json

    rec = json.loads(rec_path.read_text())
    rec["checksums_sha256"] = "0" * 64
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(SndError, match="checksum table"):
        CacheReader(tmp_path).scene("s1")


def test_size_budget_per_gaussian_reported(tmp_path):
    """Stored bytes per Gaussian for noisy MVSplat-like fields stay well below float32's 44 B."""
    ref = write_scene(tmp_path, "s2", 4, H=32, W=48, pps=4)
    nbytes = sum(p.stat().st_size for p in (tmp_path / "s2").rglob("*") if p.is_file())
    per_gaussian = nbytes / (4 * 2 * 32 * 48)
    assert per_gaussian < 14, per_gaussian  # white-noise fields: ~10.5 B + masks; real fields compress more
    assert math.isfinite(per_gaussian) and ref["depth"].dtype == np.float16
