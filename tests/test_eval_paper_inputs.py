"""What the backbone receives under the paper protocol: FiT3D's ScanNet++ frames (OpenCV's uint8 INTER_CUBIC,
`snd.data.cv2_cubic`, checked against hand-computed values) and, for the ScanNet++ reader, FiT3D's order of
downscaling and undistortion (checked against frames rendered along the true rays)."""
import numpy as np
import pytest

from snd.data.camera import Camera
from snd.data.cv2_cubic import cubic_taps, resize_cubic_cv2
from snd.data.fisheye import toolkit_new_K
from snd.data.raycast import MeshRaycaster
from snd.data.scannetpp import ScanNetppScene
from snd.data.synth import build_scene, fisheye_intrinsics, generate_dataset
from snd.pipeline.config import SynthConfig


def keys(d: float, a: float = -0.75) -> float:
    """Keys' cubic kernel at distance d (the textbook piecewise form, independent of OpenCV's expression)."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def test_halving_taps_are_at_half_and_one_and_a_half_pixels():
    # output pixel d sits at source 2d + 0.5: taps 2d-1..2d+2 at distances 1.5, 0.5, 0.5, 1.5
    assert keys(0.5) == 0.59375 and keys(1.5) == -0.09375
    idx, w = cubic_taps(8, 4)
    assert (w == np.array([-0.09375, 0.59375, 0.59375, -0.09375]) * 2048).all()  # -192, 1216, 1216, -192
    assert idx.tolist() == [[0, 0, 1, 2], [1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 7]]  # edges replicated


def test_non_integer_scale_weights_are_keys_rounded():
    # 5 -> 3: output 0 at source 1/3 (taps -1..2, the -1 replicated), output 1 exactly on source 2, output 2 at
    # source 3 + 2/3 (taps 2..5, the 5 replicated)
    idx, w = cubic_taps(5, 3)
    t = 1 / 3
    assert w[0].tolist() == [round(keys(d) * 2048) for d in (1 + t, t, 1 - t, 2 - t)] == [-228, 1631, 759, -114]
    assert w[1].tolist() == [0, 2048, 0, 0] and idx[1].tolist() == [1, 2, 3, 4]
    assert w[2].tolist() == [round(keys(d) * 2048) for d in (2 - t, 1 - t, t, 1 + t)] == [-114, 759, 1631, -228]
    assert idx[0].tolist() == [0, 0, 1, 2] and idx[2].tolist() == [2, 3, 4, 4]
    assert (w.sum(1) == 2048).all()


def _rows(v) -> np.ndarray:
    """An 8x8 image whose rows are all `v`: the vertical pass then multiplies by exactly 2048 / 2048."""
    return np.tile(np.asarray(v, dtype=np.uint8), (8, 1))


def test_interior_border_and_saturation_by_hand():
    v = [100, 50, 200, 10, 0, 255, 255, 0]
    out = resize_cubic_cv2(_rows(v), 4, 4)
    assert (out == out[0]).all()
    # output 0 (border): taps read v0, v0, v1, v2
    b = (-192 * 100 + 1216 * 100 + 1216 * 50 - 192 * 200) / 2048  # 60.94
    # output 1 (interior): v1..v4
    i = (-192 * 50 + 1216 * 200 + 1216 * 10 - 192 * 0) / 2048  # 120.0
    # output 2: v3..v6 = 10, 0, 255, 255 -> 102.97; output 3 (border): v5, v6, v7, v7 = 255, 255, 0, 0 -> 127.5 tie
    assert out[0, :3].tolist() == [round(b), round(i), round((-192 * 10 + 1216 * 255 - 192 * 255) / 2048)]
    # saturation: a bright pair between dark pixels overshoots 255, a dark pair between bright ones undershoots 0
    assert resize_cubic_cv2(_rows([0, 0, 255, 255, 0, 0, 0, 0]), 4, 4)[0].tolist() == [0, 255, 0, 0]
    assert resize_cubic_cv2(_rows([255, 255, 0, 0, 255, 255, 255, 255]), 4, 4)[0].tolist() == [255, 0, 255, 255]


def test_ties_round_half_to_even_in_the_simd_body_and_half_up_in_the_scalar_tail():
    # taps 1, 1, 0, 0: (-192 + 1216) / 2048 = 0.5 exactly; taps 3, 3, 2, 2 (x 1): 2.5 exactly
    img = _rows([0, 1, 1, 0, 0, 3, 3, 2])  # output 1 = 0.5 tie, output 3 (v5, v6, v7, v7) = (-576+3648+2432-384)/2048 = 2.5
    assert (-192 + 1216) / 2048 == 0.5 and (-192 * 3 + 1216 * 3 + 1216 * 2 - 192 * 2) / 2048 == 2.5
    simd = resize_cubic_cv2(img, 4, 4, simd_lanes=4)  # 4 elements per row: all in the vectorised body
    scalar = resize_cubic_cv2(img, 4, 4, simd_lanes=0)  # OpenCV's scalar code: (sum + 2^21) >> 22
    assert simd[0].tolist()[1::2] == [0, 2] and scalar[0].tolist()[1::2] == [1, 3]
    # 8 lanes, 4 elements per row: the whole row is OpenCV's scalar tail
    assert (resize_cubic_cv2(img, 4, 4) == scalar).all()
    # 3 channels x 4 = 12 elements: the first 8 vectorised (half to even), the last 4 scalar (half up)
    rgb = np.repeat(img[..., None], 3, -1)
    out = resize_cubic_cv2(rgb, 4, 4).reshape(4, 12)
    assert out[0, 3:6].tolist() == [0, 0, 0] and out[0, 9:12].tolist() == [3, 3, 3]


def test_two_dimensional_halving_matches_a_float_reference():
    # the exact 2x weights are exact in float64, so the separable sum is exact: round half to even everywhere
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    k = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
    p = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    ref = np.zeros((5, 7, 3))
    for y in range(5):
        for x in range(7):
            ref[y, x] = np.einsum("i,j,ijc->c", k, k, p[2 * y:2 * y + 4, 2 * x:2 * x + 4])
    ref = np.clip(np.round(ref), 0, 255)
    got = resize_cubic_cv2(img, 5, 7, simd_lanes=1)  # every element in the (half-to-even) body
    assert (got == ref).all()
    assert (resize_cubic_cv2(img[..., 0], 5, 7, simd_lanes=1) == ref[..., 0]).all()  # [H, W] input


H, W = 96, 144


@pytest.fixture(scope="module")
def fisheye_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisheye_cubic")
    names = generate_dataset(SynthConfig(out=root, scenes=1, frames=1, height=H, width=W, fisheye=True, workers=1))
    return root / "data" / names[0]


def test_fisheye_frames_follow_fit3d_order_and_camera(fisheye_scene):
    """Halved as FiT3D does (cubic on the fisheye, then undistorted at the half size with the halved fisheye K):
    the frame is the scene rendered along its pinhole rays, and its K has FiT3D's centre w/2, h/2."""
    h, w = H // 2, W // 2
    reader = ScanNetppScene(fisheye_scene, height=h, width=w, image_resize="cv2_cubic")
    Kf, k = fisheye_intrinsics(H, W)
    K_half = toolkit_new_K(np.diag([0.5, 0.5, 1.0]) @ Kf, k, h, w)
    K = reader.camera(0).K
    assert np.allclose(K, K_half) and (K[0, 2], K[1, 2]) == (w / 2, h / 2)
    assert np.allclose(K[0, 0], toolkit_new_K(Kf, k, H, W)[0, 0] / 2)  # the toolkit's focal length, halved
    # truth: the scene rendered along pinhole rays at full size (the camera whose cubic half is K, pixel centres
    # kept), halved; JPEG and texture aliasing leave ~20 levels, a focal length 5 % off leaves clearly more
    sc = build_scene(0, 0, frames=1, height=H, width=W, objects=6)
    rc = MeshRaycaster(sc.vertices, sc.faces)
    img = reader.image(0).astype(float)

    def err(f: float) -> float:
        Kf = K.copy()
        Kf[:2, :2] *= 2 * f
        Kf[:2, 2] = 2 * K[:2, 2] + 0.5
        pin = sc.render(rc, Camera(K=Kf, c2w=sc.cameras[0].c2w, height=H, width=W))
        return np.abs(img - resize_cubic_cv2(pin, h, w)).max(-1).mean()

    e = err(1.0)
    assert e < 25 and e < 0.85 * min(err(1.05), err(0.95))
    # control: the bilinear path's camera (the full-size toolkit camera, pixel centres kept) is another K
    bil = ScanNetppScene(fisheye_scene, height=h, width=w)
    assert bil.camera(0).K[0, 2] == pytest.approx((W / 2 + 0.5) / 2 - 0.5)
    assert reader.depth(0).shape == (h, w)


def test_unknown_image_resize_is_one_clear_error(fisheye_scene):
    from snd.errors import SndError

    with pytest.raises(SndError, match="image_resize"):
        ScanNetppScene(fisheye_scene, image_resize="lanczos")


def _spy_input(net):
    """Record the tensor the ViT's blocks are fed (what `extract_tokens` passes to `forward_intermediates`)."""
    from snd.models.backbone import _unwrap

    vit, seen = _unwrap(net), []
    inner = vit.forward_intermediates

    def spy(x, *a, **k):
        seen.append(x.detach().clone())
        return inner(x, *a, **k)

    vit.forward_intermediates = spy
    return seen


def test_correspondence_input_is_probe3d_normalised_and_zero_padded():
    """Paper: Probe3D's pairs are ToTensor -> Normalize(0.5, 0.5), then `center_padding` pads with zeros; fast: the
    backbone's ImageNet mean/std, no padding. A 12x13 image of three values, by hand."""
    import torch

    from snd.models.backbone import create_backbone
    from snd.stages.eval_corr import corr_model_fn

    net = create_backbone("snd_test_vit_patch14", init="random").eval()
    seen = _spy_input(net)
    img = torch.zeros(1, 3, 12, 13)
    img[0, 0] = 1.0  # red channel white
    img[0, 1, :, 6:] = 0.25
    feats = corr_model_fn(net, paper=True, precision="fp32", device=torch.device("cpu"))(img)
    x = seen[-1]
    # 12x13 -> 14x14: rows 1 | 1, columns 0 | 1 (Probe3D: pad // 2 before, the rest after)
    assert tuple(x.shape) == (1, 3, 14, 14) and tuple(feats.shape[-2:]) == (1, 1)
    assert x[0, :, 1, 0].tolist() == [1.0, -1.0, -1.0]  # (1 - 0.5) / 0.5, (0 - 0.5) / 0.5
    assert x[0, :, 12, 12].tolist() == [1.0, -0.5, -1.0]  # 0.25 -> -0.5
    assert (x[0, :, 0] == 0).all() and (x[0, :, 13] == 0).all() and (x[0, :, :, 13] == 0).all()  # zeros, not grey
    assert x[0, :, 1:13, :13].min() == -1.0
    # fast: the backbone's own normalisation (ImageNet), on an input that needs no padding
    img14 = torch.zeros(1, 3, 14, 14)
    img14[0, 0] = 1.0
    corr_model_fn(net, paper=False, precision="fp32", device=torch.device("cpu"))(img14)
    y = seen[-1]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    assert y[0, :, 5, 5].tolist() == pytest.approx([(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]], abs=1e-6)


def test_frames_made_the_fit3d_way_get_their_own_token_store_name(synth_root):
    """A token store of bilinear frames must never serve FiT3D's cubic ones: the dataset (and its flipped twin)
    carries a tag that `snd eval` appends to the store's name."""
    from snd.eval import datasets as D
    from snd.eval.protocol import FlippedImages

    plain = D.get_dataset("synth", synth_root, "val", "depth", (56, 84))
    cubic = D.get_dataset("synth", synth_root, "val", "depth", (56, 84), image_resize="cv2_cubic")
    assert plain.frame_tag == "" and cubic.frame_tag == "-cv2_cubic"
    assert FlippedImages(cubic).frame_tag == "-cv2_cubic" and FlippedImages(plain).frame_tag == ""
