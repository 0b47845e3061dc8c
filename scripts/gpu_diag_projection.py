"""GPU diagnostic: compare gsplat's projection (radii, means2d, conics, depths) with snd's torch projection on
the scene of tests/test_splat_render.py, and locate the pixels where the two renders differ."""
import json
import sys

import torch

sys.path.insert(0, "tests")
from test_splat_render import _random_scene  # noqa: E402

from gsplat import fully_fused_projection  # noqa: E402

from snd.splat.inputs import SplatInput  # noqa: E402
from snd.splat.render import render_features  # noqa: E402
from snd.splat.render_torch import project_gaussians  # noqa: E402

dev = "cuda"
means, quats, scales, opac, feats, K, w2c = _random_scene(4000, 3, 11, device=dev)
scales = scales * 0.3
H, W = 60, 80
K = K.clone(); K[0] *= 4.2; K[1] *= 4.4
Kg = K.clone(); Kg[0, 2] += 0.5; Kg[1, 2] += 0.5
radii, m2d, depths, conics, _ = fully_fused_projection(means, None, quats, scales, w2c[None], Kg[None], W, H,
                                                       eps2d=0.3, packed=False, opacities=opac)
radii, m2d, depths, conics = radii[0], m2d[0], depths[0], conics[0]
p = project_gaussians(SplatInput(means, quats, scales, opac, K, w2c, H, W))
g_alive = (radii > 0).all(-1).nonzero().squeeze(1)
t_alive = p.ids
print(json.dumps({"gsplat_alive": int(g_alive.numel()), "torch_alive": int(t_alive.numel()),
                  "only_gsplat": sorted(set(g_alive.tolist()) - set(t_alive.tolist()))[:20],
                  "only_torch": sorted(set(t_alive.tolist()) - set(g_alive.tolist()))[:20]}))
common = torch.tensor(sorted(set(g_alive.tolist()) & set(t_alive.tolist())), device=dev)
pos = {int(i): k for k, i in enumerate(t_alive.tolist())}
tk = torch.tensor([pos[int(i)] for i in common.tolist()], device=dev)
for name, a, b in (("radii", radii[common].float(), p.radii[tk].float()), ("means2d", m2d[common], p.means2d[tk]),
                   ("conics", conics[common], p.conics[tk]), ("depths", depths[common], p.depths[tk])):
    d = (a - b).abs().max(-1).values if a.ndim > 1 else (a - b).abs()
    worst = int(d.argmax())
    print(json.dumps({"field": name, "max_abs": d.max().item(), "n_diff>1e-3": int((d > 1e-3 * (1 + b.abs().max())).sum()),
                      "worst_id": int(common[worst]), "gsplat": a[worst].tolist(), "torch": b[worst].tolist(),
                      "z": p.depths[tk][worst].item(), "opacity": p.opacities[tk][worst].item()}))
gi, ga = render_features(SplatInput(means, quats, scales, opac, K, w2c, H, W), feats, backend="gsplat")
ti, ta = render_features(SplatInput(means, quats, scales, opac, K, w2c, H, W), feats, backend="torch")
d = (ga - ta).abs()
bad = (d > 1e-3).nonzero()
print(json.dumps({"n_bad_px": int(bad.shape[0]), "alpha_max": d.max().item(),
                  "bad_px": bad[:10].tolist(), "g_alpha": ga[bad[:10, 0], bad[:10, 1]].tolist(),
                  "t_alpha": ta[bad[:10, 0], bad[:10, 1]].tolist()}))
