"""Probes learn from tokens that linearly encode the target (beating the trivial predictor), resume exactly,
and the schedules match the official formulas."""
from __future__ import annotations

import math

import pytest
import torch

from snd.eval.metrics import ConfusionAccumulator, MeanAccumulator, depth_metrics, normal_metrics
from snd.eval.probes import DepthProbe, NormalProbe, ProbeData, ProbeSpec, SegProbe, evaluate_probe, train_probe
from snd.eval.probes.depth import gradient_loss, sig_loss
from snd.eval.probes.normals import angular_nll
from snd.eval.probes.schedules import lr_factor
from tests._stores import MemoryStore, identity_norm

GRID = (4, 4)
UP = 4  # label pixels per patch side
C = 12
LEVELS = torch.tensor([1.0, 2.0, 3.0, 4.0])
DIRS = torch.nn.functional.normalize(torch.tensor([[0.0, 0, 1], [1, 0, 1], [0, -1, 0.3], [-1, 0.5, 0.5]]), dim=1)


def _toy(n: int, seed: int):
    """Per-patch class ids 0..3; tokens = noisy one-hot of the id (+ a CLS row); labels per pixel."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (n, *GRID), generator=g)
    onehot = torch.nn.functional.one_hot(ids, C).float() * 3 + 0.3 * torch.randn(n, *GRID, C, generator=g)
    tokens = torch.cat([torch.randn(n, 1, C, generator=g), onehot.reshape(n, -1, C)], 1)  # [n, 1+16, C]
    pix = ids.repeat_interleave(UP, 1).repeat_interleave(UP, 2)  # [n, 16, 16]
    items = [{"image": torch.zeros(3, *pix.shape[1:]), "depth": LEVELS[pix[i]], "seg": pix[i],
              "normals": DIRS[pix[i]].permute(2, 0, 1).contiguous()} for i in range(n)]
    return items, MemoryStore(tokens)


pytestmark = pytest.mark.usefixtures("one_thread")


NORM = identity_norm(C)
QUICK = ProbeSpec(iters=150, batch=4, lr=2e-2, weight_decay=0.0, schedule="constant", warmup=0)


def _fit_eval(probe, task, quick=QUICK):
    tr_items, tr_store = _toy(32, 0)
    va_items, va_store = _toy(8, 1)
    train_probe(probe, ProbeData(tr_items, list(range(32)), task, tr_store), quick, grid=GRID, norm=NORM, seed=0)
    metrics, samples = evaluate_probe(probe, ProbeData(va_items, list(range(8)), task, va_store), grid=GRID, norm=NORM)
    return metrics, samples, tr_items, va_items


def test_depth_probe_beats_mean_depth():
    m, samples, tr, va = _fit_eval(DepthProbe(C, min_depth=1e-3, max_depth=5.0), "depth")
    mean_depth = torch.stack([it["depth"] for it in tr]).mean()
    base = MeanAccumulator()
    for it in va:
        base.update(depth_metrics(torch.full_like(it["depth"], float(mean_depth))[None], it["depth"][None], max_depth=5.0))
    b = base.compute()
    assert m["abs_rel"] < 0.5 * b["abs_rel"], (m, b)
    assert m["rmse"] < 0.5 * b["rmse"], (m, b)
    assert samples[0]["pred"].shape == (16, 16)


def test_normal_probe_beats_mean_normal():
    m, samples, tr, va = _fit_eval(NormalProbe(C), "normals")
    mean_n = torch.nn.functional.normalize(torch.stack([it["normals"] for it in tr]).mean((0, 2, 3)), dim=0)
    base = MeanAccumulator()
    for it in va:
        base.update(normal_metrics(mean_n.view(1, 3, 1, 1).expand(1, 3, 16, 16), it["normals"][None]))
    b = base.compute()
    assert m["mean"] < 0.5 * b["mean"], (m, b)
    assert m["pct_30"] > b["pct_30"] + 20, (m, b)
    assert torch.allclose(samples[0]["pred"].norm(dim=0), torch.ones(16, 16), atol=1e-4)


def test_seg_probe_beats_majority_class():
    m, _, tr, va = _fit_eval(SegProbe(C, num_classes=4), "seg")
    counts = torch.bincount(torch.stack([it["seg"] for it in tr]).reshape(-1), minlength=4)
    base = ConfusionAccumulator(4)
    for it in va:
        base.update(torch.full_like(it["seg"], int(counts.argmax())), it["seg"])
    b = base.compute()
    assert m["mIoU"] > b["mIoU"] + 40, (m, b)
    assert m["aAcc"] > 80, m


def test_probe_resume_is_exact(tmp_path):
    items, store = _toy(12, 0)
    data = ProbeData(items, list(range(12)), "seg", store)
    spec = ProbeSpec(iters=20, batch=4, lr=1e-2, weight_decay=1e-4, schedule="mmcv_poly", warmup=5, warmup_ratio=1e-6)
    torch.manual_seed(0)
    straight = SegProbe(C, num_classes=4)
    torch.manual_seed(0)
    resumed = SegProbe(C, num_classes=4)
    train_probe(straight, data, spec, grid=GRID, norm=NORM, seed=3)
    ck = tmp_path / "probe.safetensors"
    out1 = train_probe(resumed, data, spec, grid=GRID, norm=NORM, seed=3, ckpt=ck, stop_after=7)
    assert out1["steps"] == 7 and ck.is_file()
    torch.manual_seed(123)
    fresh = SegProbe(C, num_classes=4)  # different init: everything must come from the checkpoint
    out2 = train_probe(fresh, data, spec, grid=GRID, norm=NORM, seed=3, ckpt=ck)
    assert out2["start_step"] == 7 and out2["steps"] == 20
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, fresh.state_dict()[k], atol=1e-6), k
    # a finished checkpoint is not trained again
    assert train_probe(fresh, data, spec, grid=GRID, norm=NORM, seed=3, ckpt=ck)["start_step"] == 20


def test_schedules_match_official_formulas():
    # mmcv cosine with linear warm-up (ratio 1e-3): step 0 -> ~1e-3, end of warm-up -> cosine value
    assert lr_factor("mmcv_cosine", 0, 100, warmup=10, warmup_ratio=1e-3) == pytest.approx(1e-3)
    assert lr_factor("mmcv_cosine", 50, 100, warmup=10) == pytest.approx(0.5)
    assert lr_factor("mmcv_poly", 75, 100, warmup=10) == pytest.approx(0.25)
    assert lr_factor("mmcv_poly", 5, 100, warmup=10, warmup_ratio=0.0) == pytest.approx(0.95 * 0.5)
    # probe3d: linear from 0.01 to 1 over warm-up, then 0.99 cos(0.5 pi t) + 0.01
    assert lr_factor("probe3d_cosine", 0, 100, warmup=20) == pytest.approx(0.01)
    assert lr_factor("probe3d_cosine", 20, 100, warmup=20) == pytest.approx(1.0)
    assert lr_factor("probe3d_cosine", 60, 100, warmup=20) == pytest.approx(0.99 * math.cos(0.25 * math.pi) + 0.01)


def test_losses_hand_computed():
    # SigLoss: g = log(2) at one pixel and 0 at another, invalid pixel ignored
    pred, gt = torch.tensor([[2.0 - 1e-3 + 2e-3, 1.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    g = torch.log(pred[0, :2] + 1e-3) - torch.log(gt[0, :2] + 1e-3)
    assert sig_loss(pred, gt).item() == pytest.approx(math.sqrt(g.var().item() + 0.15 * g.mean().item() ** 2), rel=1e-5)
    assert sig_loss(pred, gt, warm_up=True).item() == pytest.approx(math.sqrt(0.15) * abs(g.mean().item()), rel=1e-5)
    # a constant-ratio prediction has no log-gradient error
    d = torch.rand(1, 12, 12) + 1
    assert gradient_loss(d * 1.0, d).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_loss(d * torch.linspace(1, 2, 12), d).item() > 0
    # angular NLL at a perfect prediction with kappa logit k: log(1+e^{-kappa pi}) - log(1+kappa^2)
    n = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    pred = torch.cat([n, torch.full((1, 1, 1, 1), 2.0)], 1)
    kappa = 3.01
    theta = math.acos(1 - 1e-4)
    want = math.log1p(math.exp(-kappa * math.pi)) - math.log1p(kappa ** 2) + kappa * theta
    assert angular_nll(pred, n, torch.ones(1, 1, 1, dtype=torch.bool)).item() == pytest.approx(want, rel=1e-4)


def test_lr_scale_multiplies_the_recipe_lr_and_enters_the_protocol_hash_only_when_set():
    from snd.eval.probes import default_spec
    from snd.pipeline.config import EvalConfig
    from snd.stages.evaluate import _protocol

    base = default_spec("seg", 10)
    quick = base.with_overrides(iters=300, lr_scale=10.0)
    assert quick.lr == pytest.approx(10 * base.lr) and base.lr == 1e-3  # the paper's recipe is untouched
    assert quick.iters == 300 and quick.warmup == round(base.warmup * 300 / base.iters)
    assert base.with_overrides(iters=300).lr == base.lr
    with pytest.raises(ValueError, match="lr_scale"):
        base.with_overrides(lr_scale=0.0)
    assert "lr_scale" not in _protocol(EvalConfig())  # old result folders keep their hash
    assert _protocol(EvalConfig(lr_scale=10.0))["lr_scale"] == 10.0
