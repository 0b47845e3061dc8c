"""Pictures of features (snd.viz, `snd features`) and `snd doctor`, checked against procedural ground truth."""
from __future__ import annotations

import numpy as np
import torch

from snd.data import open_dataset
from snd.viz import kmeans, mutual_nn, pca_colors
from tests._cli import run_cli


def _instance_features(masks: list[np.ndarray], dim: int = 32, noise: float = 0.05, seed: int = 0) -> list[torch.Tensor]:
    """Features that know the objects: a random code per instance id plus noise, [C, H, W] per view."""
    g = torch.Generator().manual_seed(seed)
    ids = np.unique(np.concatenate([m.ravel() for m in masks]))
    codes = {int(i): torch.randn(dim, generator=g) for i in ids}
    out = []
    for m in masks:
        f = torch.stack([codes[int(i)] for i in m.ravel()]).T.reshape(dim, *m.shape)
        out.append(f + noise * torch.randn(f.shape, generator=g))
    return out


def test_pca_colours_separate_objects_and_agree_across_views(synth_root):
    scene = open_dataset(synth_root, height=56, width=84).scene(open_dataset(synth_root).scene_names("all")[0])
    masks = [scene.instance_mask(0)[::4, ::4], scene.instance_mask(3)[::4, ::4]]
    feats = _instance_features(masks)
    cols = pca_colors(feats)
    again = pca_colors([f.clone() for f in feats])
    assert all(torch.equal(a, b) for a, b in zip(cols, again))  # deterministic
    assert all(c.shape == (*m.shape, 3) and c.min() >= 0 and c.max() <= 1 for c, m in zip(cols, masks))
    # within one instance colours are close; across instances far (on average)
    c = torch.cat([x.reshape(-1, 3) for x in cols])
    lab = torch.as_tensor(np.concatenate([m.ravel() for m in masks]))
    same = lab[:, None] == lab[None, :]
    d = torch.cdist(c, c)
    assert d[same].mean() < 0.25 * d[~same].mean()
    # the same instance in the two views gets the same colour (joint fit)
    shared = set(np.unique(masks[0])) & set(np.unique(masks[1]))
    assert shared
    for i in shared:
        c0 = cols[0][torch.as_tensor(masks[0] == i)].mean(0)
        c1 = cols[1][torch.as_tensor(masks[1] == i)].mean(0)
        assert (c0 - c1).norm() < 0.1


def test_kmeans_recovers_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    truth = torch.arange(400) % 4
    X = centres[truth] + 0.1 * torch.randn(400, 16, generator=g)
    labels, _ = kmeans(X, 4, seed=1)
    # a perfect clustering up to a permutation of the labels
    pairs = {(int(a), int(b)) for a, b in zip(truth, labels)}
    assert len(pairs) == 4
    assert torch.equal(labels, kmeans(X, 4, seed=1)[0])


def test_mutual_nn_on_a_shifted_copy():
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(16, 6, 8, generator=g)
    f1 = torch.roll(f0, shifts=2, dims=2)  # view 1 sees the same patches 2 columns to the right (wrapped)
    i0, i1, s = mutual_nn(f0, f1)
    assert len(i0) == 48 and torch.allclose(s, torch.ones_like(s))
    y0, x0 = i0 // 8, i0 % 8
    y1, x1 = i1 // 8, i1 % 8
    assert torch.equal(y0, y1) and torch.equal((x0 + 2) % 8, x1)


def test_cli_features_and_doctor(synth_root, tmp_path, capsys):
    imgs = sorted((synth_root / "data").glob("*/dslr/resized_undistorted_images/*.JPG"))[:2]
    assert len(imgs) == 2
    out = tmp_path / "feat"
    rc = run_cli(["features", str(imgs[0]), str(imgs[1]), "--model", "snd_test_vit_patch14", "--out", str(out),
               "--device", "cpu", "--clusters", "3"])
    # a name without weights is refused (snd never downloads)...
    assert rc == 2 and "no pretrained weights" in capsys.readouterr().err
    # ... an exported/timm-layout weights file works
    import timm
    from safetensors.torch import save_file

    m = timm.create_model("snd_test_vit_patch14", num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert run_cli(["features", str(imgs[0]), str(imgs[1]), "--model", str(tmp_path / "w.safetensors"), "--out", str(out),
                 "--device", "cpu", "--clusters", "3"]) == 0
    npz = np.load(out / "features.npz")
    assert npz["patches"].shape == (2, 64, 8, 12) and npz["cls"].shape == (2, 64)
    for name in (f"{imgs[0].stem}_pca.png", f"{imgs[1].stem}_kmeans.png", "matches.png"):
        assert (out / name).stat().st_size > 0
    from PIL import Image

    assert Image.open(out / f"{imgs[0].stem}_pca.png").size == (168, 112)
    assert run_cli(["features", str(tmp_path / "missing.jpg"), "--model", "x"]) == 2
    assert run_cli(["doctor", "--data-root", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "dataset nyuv2" in text
