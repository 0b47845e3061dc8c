"""The backbone contract: every timm ViT in snd's registry (DINOv2 and DINOv3, test models included) gives
patch tokens on its own patch grid without CLS/register tokens, a final-norm CLS, handles input sizes, takes
LoRA on the registry's targets (identity at step 0) and round-trips its weights strictly. Adding a family
is one `REGISTRY` entry that passes this file (built at depth 1 so each model takes well under a second)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from snd.errors import SndError
from snd.models.backbone import (REGISTRY, create_backbone, embed_dim, extract, normalize, patch_size,
                                 set_input_size)
from snd.models.lora import apply_lora, lora_layers, merged_copy
from snd.models.weights import guess_arch, load_backbone_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    over = None if REGISTRY[arch].test else {"depth": 1}
    return create_backbone(arch, init="random", arch_overrides=over)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_backbone_contract(arch, tmp_path):
    spec = REGISTRY[arch]
    m = _make(arch)
    p = spec.patch
    assert patch_size(m) == p
    depth = len(m.blocks)
    # tokens: [CLS, registers..., patches]; extract drops CLS and registers, keeps the final norm
    n_reg = 0 if m.reg_token is None else m.reg_token.shape[1]
    assert m.num_prefix_tokens == 1 + n_reg
    if spec.family == "dinov3":
        assert n_reg == 4  # DINOv3's storage tokens
    x = normalize(m, torch.rand(2, 3, 2 * p, 3 * p))
    with torch.no_grad():
        tokens = m.forward_features(x)
        cls, patches = extract(m, x)
    C = embed_dim(m)
    assert tokens.shape == (2, 1 + n_reg + 6, C)
    assert cls.shape == (2, C) and patches.shape == (2, C, 2, 3)
    assert torch.equal(cls, tokens[:, 0])
    assert torch.equal(patches.flatten(2).transpose(1, 2), tokens[:, 1 + n_reg:])
    # input sizes: any multiple of the patch (another grid works), others are one clear error
    with torch.no_grad():
        assert extract(m, normalize(m, torch.rand(1, 3, 4 * p, 2 * p)))[1].shape == (1, C, 4, 2)
    set_input_size(m, (3 * p, 5 * p))
    with pytest.raises(SndError, match=f"patch size {p}"):
        set_input_size(m, (3 * p + 1, 5 * p))
    # LoRA: the registry's targets (+ the patch embedding), all Linear, identity at step 0
    ref = _make(arch)
    lm = apply_lora(m)
    names = list(lora_layers(lm))
    assert len(names) == 2 * depth + 1 and "patch_embed.proj" in names
    assert all(n == "patch_embed.proj" or n.endswith(spec.lora) for n in names)
    assert all(isinstance(lora_layers(lm)[n].get_base_layer(), nn.Linear) for n in names if n != "patch_embed.proj")
    lm.eval()
    with torch.no_grad():
        assert torch.allclose(extract(lm, x)[1], extract(ref, x)[1], atol=1e-6)
        assert torch.allclose(extract(merged_copy(lm), x)[1], extract(ref, x)[1], atol=1e-6)
    # weights: the timm layout round-trips strictly, and a file names its own architecture
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    assert guess_arch(ref.state_dict()) == arch
    dst = _make(arch)
    for prm in dst.parameters():
        nn.init.zeros_(prm) if prm.dim() < 2 else None
    rep = load_backbone_weights(dst, f)
    assert rep.dropped == [] and all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), ref.state_dict().values()))
