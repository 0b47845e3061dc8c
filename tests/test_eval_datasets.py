"""Every probe dataset reader on a tiny fake tree written here in the dataset's real published format."""
from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import snd.eval.datasets as D
from snd.errors import SndError
from snd.eval.datasets.matfile import load_mat
from snd.eval.datasets.transforms import center_crop_box, normals_from_depth, resize_normals
from snd.eval.datasets.voc import voc_colormap


# -- independent writers of the real formats ------------------------------------------------------
def write_mat_v5(path: Path, arrays: dict[str, np.ndarray], *, compress: bool = False) -> None:
    """A MATLAB level-5 MAT file of double matrices (written from the format spec, not our reader)."""

    def element(mtype: int, payload: bytes) -> bytes:
        pad = (-len(payload)) % 8
        return struct.pack("<II", mtype, len(payload)) + payload + b"\0" * pad

    out = bytearray(b"MATLAB 5.0 MAT-file, written by snd tests".ljust(116, b" ") + b"\0" * 8)
    out += struct.pack("<H", 0x0100) + b"IM"
    for name, arr in arrays.items():
        arr = np.atleast_2d(np.asarray(arr, dtype=np.float64))
        body = element(6, struct.pack("<II", 6, 0))  # miUINT32 flags: class 6 = double
        body += element(5, np.array(arr.shape, dtype="<i4").tobytes())
        body += element(1, name.encode())
        body += element(9, arr.astype("<f8").tobytes(order="F"))
        mat = struct.pack("<II", 14, len(body)) + body
        if compress:  # compressed elements are not padded to 8 bytes
            z = zlib.compress(mat)
            out += struct.pack("<II", 15, len(z)) + z
        else:
            out += mat
    path.write_bytes(bytes(out))


def write_mat_v73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A -v7.3 MAT file: 512-byte MATLAB userblock + HDF5, arrays stored with reversed axes (as MATLAB does)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(116, b" "))


def png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)


# -- MAT reader ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
def test_mat_v5_reader(tmp_path, compress):
    a = np.arange(6, dtype=np.float64).reshape(3, 2) * 1.5
    write_mat_v5(tmp_path / "x.mat", {"trainNdxs": np.array([[1], [3], [4]]), "a": a}, compress=compress)
    m = load_mat(tmp_path / "x.mat")
    np.testing.assert_array_equal(m["trainNdxs"], [[1], [3], [4]])
    np.testing.assert_array_equal(m["a"], a)


# -- NYUv2 ------------------------------------------------------------------------------------------
N, H, W = 6, 12, 16


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    d = root / "nyuv2"
    d.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)  # what MATLAB calls images(:,:,:,i)
    depths = rng.uniform(0.5, 12.0, (N, H, W)).astype(np.float32)
    labels = rng.choice([0, 5, 7, 9], size=(N, H, W)).astype(np.uint16)
    normals = rng.normal(size=(N, H, W, 3)).astype(np.float32)
    normals[:, 0, 0] = 0.0  # invalid pixel
    # h5py sees MATLAB arrays with reversed axes: [H,W,3,N] -> [N,3,W,H], [H,W,N] -> [N,W,H]
    write_mat_v73(d / "nyu_depth_v2_labeled.mat", {
        "images": images.transpose(0, 3, 2, 1), "depths": depths.transpose(0, 2, 1),
        "labels": labels.transpose(0, 2, 1),
    })
    write_mat_v5(d / "splits.mat", {"trainNdxs": np.array([[1], [3], [4]]), "testNdxs": np.array([[2], [5], [6]])},
                 compress=True)
    mapping = np.zeros(894)
    mapping[[4, 6, 8]] = [1, 23, 25]  # raw 5 -> wall, raw 7 -> books, raw 9 -> television (1-based raw ids)
    write_mat_v5(d / "classMapping40.mat", {"mapClass": mapping[None]})
    with gzip.open(d / "all_normals.pklz", "wb") as f:
        pickle.dump({"all_normals": normals}, f, protocol=2)
    return root, dict(images=images, depths=depths, labels=labels, normals=normals)


def test_nyuv2_depth_image_and_split(nyu_root):
    root, t = nyu_root
    ds = D.get_dataset("nyuv2", root, "train", "depth", (H, W))
    assert len(ds) == 3
    s = ds[1]  # trainNdxs[1] = 3 (1-based) -> image 2
    assert s["meta"] == {"dataset": "nyuv2", "split": "train", "index": 1, "id": "0003"}
    np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy(), t["images"][2] / 255.0, atol=1e-6)
    exp = np.where(t["depths"][2] <= 10.0, t["depths"][2], 0.0)
    np.testing.assert_allclose(s["depth"].numpy(), exp, rtol=1e-6)
    assert (s["depth"] == 0).any()  # values above 10 m became invalid
    val = D.get_dataset("nyuv2", root, "val", "depth", (H, W))
    assert [val[i]["meta"]["id"] for i in range(3)] == ["0002", "0005", "0006"]
    with pytest.raises(SndError, match="NYUCrop .* needs the 480x640 frames"):  # the paper's training crop
        D.get_dataset("nyuv2", root, "train", "depth", (14, 28), whole_frame=True)[0]


def test_nyuv2_seg_13_classes(nyu_root):
    root, t = nyu_root
    s = D.get_dataset("nyuv2", root, "train", "seg", (H, W))[0]
    lab = t["labels"][0]
    # hand table: raw 5 -> NYU40 wall -> 13-class wall (12) -> id 11; raw 7 -> books (2) -> 1; raw 9 -> TV (11) -> 10
    exp = np.select([lab == 5, lab == 7, lab == 9], [11, 1, 10], 255)
    np.testing.assert_array_equal(s["seg"].numpy(), exp)
    assert D.num_classes("nyuv2") == 13


def test_nyuv2_normals_and_safe_pickle(nyu_root, tmp_path):
    root, t = nyu_root
    s = D.get_dataset("nyuv2", root, "val", "normals", (H, W))[0]  # testNdxs[0] = 2 -> image 1
    n = t["normals"][1]
    exp = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(s["normals"].permute(1, 2, 0).numpy(), exp, atol=1e-6)
    assert float(s["normals"][:, 0, 0].abs().sum()) == 0.0
    assert (root / "nyuv2" / "normals.npy").is_file()  # converted once for memory-mapped reads

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "all_normals.pklz"
    with gzip.open(bad, "wb") as f:
        pickle.dump({"all_normals": Evil()}, f)
    from snd.eval.datasets.nyuv2 import load_normals_pklz

    with pytest.raises(SndError, match="refusing"):
        load_normals_pklz(bad)


def test_nyuv2_missing_files(tmp_path, nyu_root):
    with pytest.raises(SndError, match="nyu_depth_v2_labeled.mat"):
        D.get_dataset("nyuv2", tmp_path, "train", "depth", (14, 14))
    root, _ = nyu_root
    partial = tmp_path / "nyuv2"
    partial.mkdir()
    for f in ("nyu_depth_v2_labeled.mat", "splits.mat"):
        (partial / f).symlink_to(root / "nyuv2" / f)
    with pytest.raises(SndError, match="classMapping40.mat"):
        D.get_dataset("nyuv2", tmp_path, "train", "seg", (14, 14))
    with pytest.raises(SndError, match="all_normals.pklz"):
        D.get_dataset("nyuv2", tmp_path, "train", "normals", (14, 14))
    status = D.available(tmp_path)["nyuv2"]
    assert status.startswith("ok") and "all_normals.pklz" in status and "classMapping40.mat" in status


# -- VOC, ADE20k ------------------------------------------------------------------------------------
def test_voc_palette_png(tmp_path):
    base = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(1)
    labs = {}
    for i in ("2007_000032", "2007_000039", "2007_000063"):
        lab = rng.choice([0, 1, 15, 20, 255], size=(10, 14)).astype(np.uint8)
        im = Image.fromarray(lab, mode="P")
        im.putpalette(voc_colormap().reshape(-1).tolist())
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        im.save(base / "SegmentationClass" / f"{i}.png")
        png(base / "JPEGImages" / f"{i}.jpg", rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
        labs[i] = lab
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000039\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000063\n")
    ds = D.get_dataset("voc", tmp_path, "train", "seg", (10, 14))
    assert len(ds) == 2 and D.num_classes("voc") == 21
    np.testing.assert_array_equal(ds[1]["seg"].numpy(), labs["2007_000039"])
    # an RGB-converted label PNG maps back through the VOC colour map
    rgb = voc_colormap()[labs["2007_000063"]]
    Image.fromarray(rgb).save(base / "SegmentationClass" / "2007_000063.png")
    np.testing.assert_array_equal(D.get_dataset("voc", tmp_path, "val", "seg", (10, 14))[0]["seg"].numpy(),
                                  labs["2007_000063"])


def test_ade20k(tmp_path):
    b = tmp_path / "ade20k" / "ADEChallengeData2016"
    lab = np.array([[0, 1, 150], [37, 0, 2]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    for sub, name in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        png(b / "images" / sub / f"{name}.jpg", np.full((8, 12, 3), 128, np.uint8))
        png(b / "annotations" / sub / f"{name}.png", lab)
    s = D.get_dataset("ade20k", tmp_path, "val", "seg", (8, 12))[0]
    exp = np.array([[255, 0, 149], [36, 255, 1]]).repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(s["seg"].numpy(), exp)
    assert s["meta"]["id"] == "ADE_val_00000001" and D.num_classes("ade20k") == 150


# -- KITTI ----------------------------------------------------------------------------------------
def test_kitti_depth_selection_random_split(tmp_path):
    sel = tmp_path / "kitti" / "depth_selection" / "val_selection_cropped"
    depths = {}
    for k in range(7):
        stem = f"2011_09_26_drive_0002_sync_{{}}_{k:010d}_image_02.png"
        d = (np.arange(10 * 20).reshape(10, 20) * 37 % 20000).astype(np.uint16)
        d[0, 0] = 0
        png(sel / "image" / stem.format("image"), np.full((10, 20, 3), k * 10, np.uint8))
        png(sel / "groundtruth_depth" / stem.format("groundtruth_depth"), d)
        depths[stem.format("image")[:-4]] = d
    tr = D.get_dataset("kitti", tmp_path, "train", "depth", (10, 20), eval_crop=False)
    va = D.get_dataset("kitti", tmp_path, "val", "depth", (10, 20), eval_crop=False)
    ids_tr = {tr[i]["meta"]["id"] for i in range(len(tr))}
    ids_va = {va[i]["meta"]["id"] for i in range(len(va))}
    assert len(ids_tr) == 6 and len(ids_va) == 1 and not ids_tr & ids_va  # 85/15 of 7
    s = tr[0]
    np.testing.assert_allclose(s["depth"].numpy(), depths[s["meta"]["id"]] / 256.0)
    assert float(s["depth"][0, 0]) == 0.0
    # Garg crop on val zeroes the top rows (fractions of the frame: rows < 0.408 H)
    vc = D.get_dataset("kitti", tmp_path, "val", "depth", (10, 20))[0]["depth"]
    assert float(vc[:4].abs().sum()) == 0.0 and float(vc[5:9, 2:18].min()) > 0


def test_kitti_split_files_kb_crop(tmp_path):
    k = tmp_path / "kitti"
    img = np.random.default_rng(0).integers(0, 256, (375, 1242, 3), dtype=np.uint8)
    dep = np.full((375, 1242), 512, np.uint16)
    png(k / "raw/2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000005.png", img)
    png(k / "data_depth_annotated/train/2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000005.png", dep)
    (k / "kitti_train.txt").write_text(
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000005.png "
        "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000005.png 721.5377\n"
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000006.png None 721.5377\n")
    (k / "kitti_val.txt").write_text("")
    ds = D.get_dataset("kitti", tmp_path, "train", "depth", (352, 1216))
    assert len(ds) == 1  # the line without depth is skipped
    s = ds[0]
    np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy(), img[23:, 13:1229] / 255.0, atol=1e-6)
    assert torch.all(s["depth"] == 2.0)


# -- ScanNet frames -------------------------------------------------------------------------------
def test_scannet_frames(tmp_path):
    b = tmp_path / "scannet" / "scannet_frames_25k"
    for scene in ("scene0000_00", "scene0001_00"):
        for f in ("000000", "000100", "000200"):
            png(b / scene / "color" / f"{f}.jpg", np.full((24, 32, 3), 100, np.uint8))
            png(b / scene / "depth" / f"{f}.png", np.full((12, 16), 1500, np.uint16))
            png(b / scene / "label" / f"{f}.png", np.array([[0, 1], [40, 7]], np.uint8).repeat(12, 0).repeat(16, 1))
    tr = D.get_dataset("scannet", tmp_path, "train", "seg", (24, 32))
    va = D.get_dataset("scannet", tmp_path, "val", "depth", (24, 32), seed=0)
    assert len(tr) == 5 and len(va) == 1
    assert va[0]["meta"]["id"] not in {tr[i]["meta"]["id"] for i in range(5)}
    np.testing.assert_array_equal(tr[0]["seg"].numpy(), np.array([[255, 0], [39, 6]]).repeat(12, 0).repeat(16, 1))
    d = va[0]["depth"]
    assert d.shape == (24, 32) and torch.allclose(d, torch.full_like(d, 1.5))
    # raw ScanNet ids (> 40) need the label table
    png(b / "scene0000_00" / "label" / "000000.png", np.full((24, 32), 1163, np.uint16))
    fid = "scene0000_00/000000"
    split = "train" if fid in tr.ids else "val"
    ds = D.get_dataset("scannet", tmp_path, split, "seg", (24, 32))
    with pytest.raises(SndError, match="scannetv2-labels.combined.tsv"):
        ds[ds.ids.index(fid)]
    (tmp_path / "scannet" / "scannetv2-labels.combined.tsv").write_text(
        "id\traw_category\tcategory\tcount\tnyu40id\n1163\tstool\tstool\t3\t40\n")
    ds = D.get_dataset("scannet", tmp_path, split, "seg", (24, 32))
    assert torch.all(ds[ds.ids.index(fid)]["seg"] == 39)


# -- registry, resizing ---------------------------------------------------------------------------
def test_registry_errors_and_available(tmp_path):
    with pytest.raises(SndError, match="unknown dataset 'nyu'.*nyuv2"):
        D.get_dataset("nyu", tmp_path, "train", "depth", (14, 14))
    with pytest.raises(SndError, match="no 'depth' task"):
        D.get_dataset("voc", tmp_path, "train", "depth", (14, 14))
    with pytest.raises(SndError, match="unknown split"):
        D.get_dataset("voc", tmp_path, "test", "seg", (14, 14))
    av = D.available(tmp_path)
    assert set(av) == set(D.list_datasets())
    assert all(not v.startswith("ok") for v in av.values())
    assert "scannet_test_pairs_with_gt.txt" in av["scannet1500"] and "VOCtrainval" in av["voc"]
    assert D.list_datasets("correspondence") == ["scannet1500", "synth"]


def test_center_crop_and_normals_resize():
    assert center_crop_box(480, 640, (14, 14)) == (0, 80, 480, 480)
    assert center_crop_box(100, 50, (28, 28)) == (25, 0, 50, 50)
    n = np.zeros((4, 4, 3), np.float32)
    n[..., 2] = 2.0
    n[0, 0] = 0
    out = resize_normals(n, (8, 8))
    assert torch.allclose(out[:, 2:, 2:].norm(dim=0), torch.ones(6, 6)) and float(out[:, 0, 0].abs().sum()) == 0


def test_normals_from_depth_plane():
    """A tilted plane n.X = c seen by a pinhole camera: every valid normal equals the plane normal."""
    K = np.array([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]])
    nrm = np.array([0.3, -0.2, -1.0])
    nrm /= np.linalg.norm(nrm)
    v, u = np.mgrid[0:48, 0:64].astype(np.float64)
    rays = np.stack([(u - 31.5) / 50, (v - 23.5) / 50, np.ones_like(u)], -1)
    depth = (-3.0 / (rays @ nrm)).astype(np.float32)  # plane n.X = -3 (faces the camera)
    depth[10:14, 10:14] = 0.0  # a hole
    out = normals_from_depth(depth, K)
    valid = np.linalg.norm(out, axis=-1) > 0
    assert valid.mean() > 0.9 and not valid[11, 11]
    np.testing.assert_allclose(out[valid], np.broadcast_to(nrm, out[valid].shape), atol=1e-4)


# -- ScanNet++ / synth (procedural scenes) --------------------------------------------------------
@pytest.mark.parametrize("task", ["depth", "normals", "seg"])
def test_synth_tasks(synth_root, task):
    tr = D.get_dataset("synth", synth_root, "train", task, (56, 84))
    va = D.get_dataset("synth", synth_root, "val", task, (56, 84))
    assert len(tr) == 16 and len(va) == 16
    assert {tr[0]["meta"]["id"].split("/")[0]} != {va[0]["meta"]["id"].split("/")[0]}
    s = tr[5]
    assert s["image"].shape == (3, 56, 84) and 0 <= float(s["image"].min()) and float(s["image"].max()) <= 1
    if task == "depth":
        assert s["depth"].dtype == torch.float32 and float((s["depth"] > 0).float().mean()) > 0.95
        assert float(s["depth"].max()) < D.dataset_info("synth").depth_range[1]
    elif task == "normals":
        nrm = s["normals"].norm(dim=0)
        ok = nrm > 0
        assert float(ok.float().mean()) > 0.8 and torch.allclose(nrm[ok], torch.ones_like(nrm[ok]), atol=1e-5)
    else:
        seg = s["seg"]
        assert seg.dtype == torch.int64 and set(seg.unique().tolist()) <= set(range(D.num_classes("synth"))) | {255}
        assert len(seg.unique()) >= 3


def test_depth_ranges_are_the_official_ones():
    """One table (the official SnD depth configs: min 0.001 m; max 10 NYUv2/ScanNet, 20 ScanNet++, 80 KITTI)
    feeds the dataset registry, the probe's bins and the metrics' valid range."""
    from snd.eval import datasets as D
    from snd.eval.probes import DEPTH_RANGE
    from snd.stages.evaluate import _depth_range

    official = {"nyuv2": (0.001, 10.0), "scannet": (0.001, 10.0), "scannetpp": (0.001, 20.0), "kitti": (0.001, 80.0)}
    assert DEPTH_RANGE == official
    for name, rng in official.items():
        assert D.dataset_info(name).depth_range == rng
        assert _depth_range(name) == rng
