"""Frames in the store (schema v3): stage two trains from the store alone, bit-identical to the dataset path
at lossless storage; old stores (no frames) still train; JPEG frames decode the same on the batched path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from snd.cache.frames import decode_frame, decode_jpeg_batch, encode_frame, resize_uint8
from snd.cache.reader import CacheReader
from snd.errors import SndError
from snd.pipeline.config import DistillConfig, PrecomputeConfig
from snd.train.data import resolve_num_workers

HW = (56, 84)  # scaffold
IMG = (42, 70)  # backbone input: the frames are resized (not a no-op), 3x5 patches


@pytest.fixture(scope="module")
def data_copy(synth_root, tmp_path_factory) -> Path:
    """A private copy of the dataset (the tests delete it to prove stage two does not need it)."""
    root = tmp_path_factory.mktemp("frames") / "data"
    shutil.copytree(synth_root, root)
    return root


def _precompute(data: Path, out: Path, images: str) -> Path:
    from snd.stages.precompute import run

    s = run(PrecomputeConfig(data=data, out=out, height=HW[0], width=HW[1], pairs_per_scene=3, targets_per_pair=2,
                             batch_pairs=2, device="cpu", source="depth", operator_img_height=IMG[0],
                             operator_img_width=IMG[1], images=images), progress=False)
    assert s.failed == 0
    return out


@pytest.fixture(scope="module")
def stores(data_copy, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("frame_stores")
    return {k: _precompute(data_copy, base / k, k) for k in ("lossless", "jpeg", "off")}


def _train(store: Path, run: Path, data: Path | None = None, targets: str = "operator", iters: int = 4):
    from snd.stages.distill import run as distill

    return distill(DistillConfig(shards=store, data=data, run=run, model="snd_test_vit_patch14", init="random",
                                 img_height=IMG[0], img_width=IMG[1], head_hidden=64, head_bottleneck=32,
                                 head_prototypes=128, iters=iters, num_workers="0", log_every=2, ckpt_every=100,
                                 device="cpu", renderer="torch", targets=targets))


def test_frames_are_stored_once_each_resized_as_stage_two_does(stores, data_copy):
    from snd.data import open_dataset

    ds = open_dataset(data_copy, height=HW[0], width=HW[1])
    r = CacheReader(stores["lossless"])
    for name in r.scenes:
        sr = r.scene(name)
        used = set()
        for p in range(sr.n_pairs):
            st = sr.read_stored(p, {"ctx_index", "tgt_index"})
            used |= {int(i) for i in st["ctx_index"]} | {int(i) for i in st["tgt_index"] if i >= 0}
        assert sorted(sr._frame_row) == sorted(used)  # every used frame, once, nothing else
        assert r.records[name]["frames"] == len(used)
        scene = ds.scene(name)
        for i in sorted(used)[:3]:
            want = resize_uint8(torch.from_numpy(np.array(scene.image(i))).permute(2, 0, 1), IMG)
            assert torch.equal(sr.frame(i), want)
    assert r.verify_all() > 0
    hdr = json.loads((stores["lossless"] / "_snd" / "header.json").read_text())
    assert hdr["schema_version"] == 5 and hdr["images"] == {"codec": "lossless", "height": IMG[0], "width": IMG[1], "quality": 95,
                                                           "filter": "grad"}


def test_a_damaged_frame_is_reported_by_scene_and_frame(stores, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(stores["lossless"], bad)
    name = CacheReader(bad).scenes[0]
    crc_dir = bad / name / "frame_crc32c"
    # rewrite the frame checksum table's first entry: the marker's SHA-256 no longer matches
    import zarr

    g = zarr.open_group(store=str(bad / name), mode="r+")
    a = g["frame_crc32c"][...]
    a[0, 2] ^= 1
    g["frame_crc32c"][...] = a
    assert crc_dir.exists()
    with pytest.raises(SndError, match="frame checksum table"):
        CacheReader(bad).scene(name)


def test_store_with_frames_trains_without_the_dataset_bit_identically(stores, data_copy, tmp_path):
    ref = _train(stores["lossless"], tmp_path / "dataset", data=data_copy)  # images from the dataset (--data)
    old = _train(stores["off"], tmp_path / "old")  # a store without frames: the dataset path, default root
    hidden = data_copy.with_name("gone")
    data_copy.rename(hidden)  # the dataset is no longer where the manifest says
    try:
        got = _train(stores["lossless"], tmp_path / "store")
        with pytest.raises(SndError):
            _train(stores["lossless"], tmp_path / "fails", data=data_copy)
    finally:
        hidden.rename(data_copy)
    assert got.losses == ref.losses and len(got.losses) == 4  # bit-identical losses
    assert old.losses == ref.losses
    rows = [json.loads(x) for x in (tmp_path / "store" / "metrics.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["operator"] * 4 and all(r["it_per_s"] > 0 for r in rows)


def test_a_v2_store_without_frames_still_trains(stores, tmp_path, caplog):
    """An old store (schema v2: no frames, no `images` key) trains through the dataset with a one-line note."""
    old = tmp_path / "v2"
    shutil.copytree(stores["off"], old)
    for meta in [old / "_snd" / "header.json", old / "_snd" / "manifest.json", old / "manifest.json"]:
        if meta.exists():
            h = json.loads(meta.read_text())
            h["schema_version"] = 2
            h.pop("images", None)
            meta.write_text(json.dumps(h))
    for zj in old.glob("*/zarr.json"):
        z = json.loads(zj.read_text())
        z["attributes"]["schema_version"] = 2
        z["attributes"].pop("frames", None)
        zj.write_text(json.dumps(z))
    with caplog.at_level("WARNING"):
        s = _train(old, tmp_path / "run", targets="render", iters=2)
    assert len(s.losses) == 2 and all(np.isfinite(list(s.losses.values())))
    assert sum("has no frames" in r.message for r in caplog.records) == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["path"] for r in rows} == {"render"}


def test_frames_at_another_size_are_named_once(stores, tmp_path, caplog):
    """A run at another input size than the store's frames: one note naming both sizes and the fix; none when
    the sizes match or the dataset is read (--data)."""
    from snd.train.data import shard_stream_factory

    def notes(**kw) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING"):
            shard_stream_factory(DistillConfig(shards=stores["lossless"], model="snd_test_vit_patch14", **kw))
        return [r.message for r in caplog.records if "resized again" in r.message]

    (msg,) = notes(img_height=56, img_width=84)
    assert "42x70" in msg and "56x84" in msg and "--operator-img-height 56 --operator-img-width 84" in msg
    assert notes(img_height=IMG[0], img_width=IMG[1]) == []
    assert notes(img_height=56, img_width=84, data=tmp_path) == []


def test_jpeg_frames_decode_close_and_the_batched_path_equals_the_per_frame_one(stores):
    from snd.cache.stream import ShardStream, collate
    from snd.train.data import to_device

    lossless, jpeg = CacheReader(stores["lossless"]), CacheReader(stores["jpeg"])
    name = jpeg.scenes[0]
    i = next(iter(jpeg.scene(name)._frame_row))
    a, b = lossless.scene(name).frame(i).float(), jpeg.scene(name).frame(i).float()
    assert (a - b).abs().mean() < 3.0  # quality 95: a few grey levels on these textured frames
    assert jpeg.records[name]["frame_bytes"] < lossless.records[name]["frame_bytes"]
    # bytes through the loader (decode="device"), decoded in one batched call (CPU fallback here)
    cpu = ShardStream(stores["jpeg"], img_hw=IMG, seed=0, batch_size=2)
    dev = ShardStream(stores["jpeg"], img_hw=IMG, seed=0, batch_size=2, decode="device")
    s_cpu = [cpu.sample(j) for j in range(2)]
    s_dev = [dev.sample(j) for j in range(2)]
    assert "ctx_jpeg" in s_dev[0] and "ctx_images" not in s_dev[0]
    got = to_device(collate(s_dev), torch.device("cpu"))
    want = to_device(collate(s_cpu), torch.device("cpu"))
    assert torch.equal(got["ctx_images"], want["ctx_images"]) and torch.equal(got["tgt_image"], want["tgt_image"])


def test_frame_codecs_round_trip():
    img = torch.randint(0, 256, (3, 14, 28), dtype=torch.uint8)
    for f in ("row", "grad"):
        assert torch.equal(decode_frame(encode_frame(img, "lossless", filter=f), "lossless", (14, 28), filter=f), img)
    with pytest.raises(ValueError, match="filter"):
        encode_frame(img, "lossless")
    assert decode_frame(encode_frame(img, "jpeg", quality=90), "jpeg", (14, 28)).shape == (3, 14, 28)
    with pytest.raises(ValueError):
        encode_frame(img, "png")  # type: ignore[arg-type]


def test_num_workers_auto_from_cpus_and_path():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_num_workers("auto", device=cuda, operators=True, cpus=16) == 12
    assert resolve_num_workers("auto", device=cuda, operators=False, cpus=16) == 8
    assert resolve_num_workers("auto", device=cuda, operators=True, cpus=16, world_size=2) == 6
    assert resolve_num_workers("auto", device=cuda, operators=True, cpus=2) == 1
    assert resolve_num_workers("auto", device=cpu, operators=True, cpus=16) == 2
    assert resolve_num_workers("auto", device=cpu, operators=True, cpus=1) == 0
    assert resolve_num_workers("5", device=cuda, operators=lambda: 1 / 0, cpus=16) == 5  # not asked unless auto
    with pytest.raises(SndError, match="num-workers"):
        resolve_num_workers("many", device=cuda, operators=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batched_jpeg_decode_matches_cpu(stores):
    r = CacheReader(stores["jpeg"])
    sr = r.scene(r.scenes[0])
    blobs = [torch.from_numpy(np.array(sr.frame_bytes(i))) for i in list(sr._frame_row)[:6]]
    gpu = decode_jpeg_batch(blobs, torch.device("cuda")).cpu().int()
    cpu = decode_jpeg_batch(blobs, torch.device("cpu")).int()
    assert gpu.shape == cpu.shape and (gpu - cpu).abs().max() <= 3  # nvjpeg's IDCT/upsampling vs libjpeg's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_undo_grad_equals_the_cpu_at_the_real_frame_size():
    """The GPU's uint8 cumulative sums wrap modulo 256 as the CPU's do: a batch of 574x868 residuals of random
    frames (every partial sum overflows many times) is undone to the same frames on both devices."""
    from snd.cache.frames import grad_residual, undo_grad

    frames = np.random.default_rng(0).integers(0, 256, (3, 2, 3, 574, 868), dtype=np.uint8)
    res = torch.from_numpy(grad_residual(frames))
    assert torch.equal(undo_grad(res.cuda()).cpu(), torch.from_numpy(frames))
    assert torch.equal(undo_grad(res), torch.from_numpy(frames))


def test_grad_frames_travel_encoded_and_v4_row_frames_still_read(stores, data_copy, tmp_path, monkeypatch):
    """v5 lossless frames (the ``grad`` filter): with decode="device" the loader ships their residual planes and
    `to_device` undoes the filter for the batch, giving the same images as decoding in the worker. A v4 store
    (``row`` filter, no ``filter`` key recorded) reads the same frames, decoded in the worker either way."""
    from snd.cache.schema import FrameSpec
    from snd.cache.stream import ShardStream, collate
    from snd.stages.precompute import frames as pre_frames
    from snd.stages.precompute import settings
    from snd.stages.precompute import writer as pre_writer
    from snd.train.data import to_device

    grad = stores["lossless"]
    cpu = ShardStream(grad, img_hw=IMG, seed=0, batch_size=2)
    dev = ShardStream(grad, img_hw=IMG, seed=0, batch_size=2, decode="device")
    s_cpu, s_dev = [cpu.sample(j) for j in range(2)], [dev.sample(j) for j in range(2)]
    assert s_dev[0]["ctx_grad"].shape == (2, 3, *IMG) and "ctx_images" not in s_dev[0]
    got, want = to_device(collate(s_dev), torch.device("cpu")), to_device(collate(s_cpu), torch.device("cpu"))
    assert torch.equal(got["ctx_images"], want["ctx_images"]) and torch.equal(got["tgt_image"], want["tgt_image"])

    real = settings.frame_spec
    for mod in (settings, pre_frames, pre_writer):  # stage one as it wrote lossless frames before v5
        monkeypatch.setattr(mod, "frame_spec", lambda cfg: FrameSpec(**{**real(cfg).to_dict(), "filter": "row"}))
    old = _precompute(data_copy, tmp_path / "v4", "lossless")
    for meta in [old / "_snd" / "header.json", old / "manifest.json"]:  # as snd wrote v4 stores: no filter recorded
        if meta.exists():
            h = json.loads(meta.read_text())
            h["schema_version"] = 4
            if h.get("images"):
                del h["images"]["filter"]
            meta.write_text(json.dumps(h))
    for zj in old.glob("*/zarr.json"):
        z = json.loads(zj.read_text())
        z["attributes"]["schema_version"] = 4
        del z["attributes"]["frames"]["filter"]
        zj.write_text(json.dumps(z))
    r_old, r_new = CacheReader(old), CacheReader(grad)
    name = r_new.scenes[0]
    assert r_old.scene(name).frames.filter == "row" and r_new.scene(name).frames.filter == "grad"
    rows = sorted(r_new.scene(name)._frame_row)
    assert all(torch.equal(r_old.scene(name).frame(i), r_new.scene(name).frame(i)) for i in rows)
    on_disk = lambda root: sum(f.stat().st_size for f in (root / name / "frame_bytes").rglob("*") if f.is_file())  # noqa: E731
    assert on_disk(old) > on_disk(grad)  # the grad filter's point: fewer compressed bytes
    v4_dev = ShardStream(old, img_hw=IMG, seed=0, batch_size=2, decode="device").sample(0)
    assert "ctx_grad" not in v4_dev and torch.equal(v4_dev["ctx_images"], s_cpu[0]["ctx_images"])
    # `snd cache add-operators` on the v4 store: a v5 store whose frames are copied as stored, their row filter recorded
    from snd.pipeline.config import CacheAddOperatorsConfig
    from snd.stages.precompute.add_operators import add_operators

    add_operators(old, CacheAddOperatorsConfig(out=tmp_path / "v5", device="cpu"), progress=False)
    r5 = CacheReader(tmp_path / "v5")
    assert r5.scene(name).frames.filter == "row" and json.loads((tmp_path / "v5" / "_snd" / "header.json").read_text())["images"]["filter"] == "row"
    assert all(torch.equal(r5.scene(name).frame(i), r_new.scene(name).frame(i)) for i in rows)
