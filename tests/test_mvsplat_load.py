"""MVSplat encoder: state-dict layout equals upstream's, strict loading, and errors a user can act on."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from snd.errors import SndError
from snd.models.mvsplat import MVSplatConfig, MVSplatEncoder, convert_mvsplat_state_dict, load_mvsplat
from snd.models.mvsplat.load import identify_config, read_state_dict

DATA = Path(__file__).parent / "data"


def _reference(name: str) -> tuple[dict, list[tuple[str, str, str]]]:
    lines = (DATA / f"mvsplat_{name}_state_dict.txt").read_text().splitlines()
    cfg = json.loads(next(line for line in lines if line.startswith("# config: "))[len("# config: "):])
    rows = [tuple(line.split("\t")) for line in lines if line.strip() and not line.startswith("#")]
    return cfg, rows


@pytest.mark.parametrize("name,count", [("scannetpp", 471), ("re10k", 371)])
def test_state_dict_equals_upstream_list(name: str, count: int) -> None:
    cfg, rows = _reference(name)
    assert len(rows) == count
    assert MVSplatConfig.from_name(name).upstream_dict() == cfg
    with torch.device("meta"):
        enc = MVSplatEncoder(name)
    mine = [(k, str(tuple(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in enc.state_dict().items()]
    assert mine == rows  # same keys, same order, same shapes and dtypes


def test_presets_gaussian_adapter_and_size_multiple() -> None:
    for name in ("scannetpp", "re10k"):
        c = MVSplatConfig.from_name(name)
        assert (c.gaussian_scale_min, c.gaussian_scale_max, c.sh_degree) == (0.5, 15.0, 4)
        assert c.gaussian_raw_channels == 84 and c.size_multiple == 16
    with pytest.raises(ValueError, match="unknown MVSplat config"):
        MVSplatConfig.from_name("dtu")


def _tiny_sd(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return MVSplatEncoder(name).state_dict()


@pytest.fixture(scope="module")
def re10k_sd() -> dict[str, torch.Tensor]:
    return _tiny_sd("re10k", 3)


def test_convert_lightning_layout_and_report(re10k_sd) -> None:
    lightning = {"encoder." + k: v for k, v in re10k_sd.items()}
    lightning["decoder.background_color"] = torch.zeros(3)
    dropped: list[str] = []
    out = convert_mvsplat_state_dict(lightning, dropped=dropped)
    assert dropped == ["decoder.background_color"]
    assert list(out) == list(re10k_sd) and all(out[k] is re10k_sd[k] for k in out)
    assert convert_mvsplat_state_dict({"module." + k: v for k, v in lightning.items()}, dropped=[]).keys() == out.keys()
    assert convert_mvsplat_state_dict(re10k_sd).keys() == re10k_sd.keys()  # bare layout passes through
    with pytest.raises(ValueError, match="no known MVSplat module"):
        convert_mvsplat_state_dict({**lightning, "optimizer.thing": torch.zeros(1)})


def test_lightning_ckpt_round_trip_identical_outputs(tmp_path: Path, re10k_sd) -> None:
    ckpt = tmp_path / "re10k.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in re10k_sd.items()}, "epoch": 7, "global_step": 300000,
                "pytorch-lightning_version": "2.2.0"}, ckpt)
    enc = load_mvsplat(ckpt, "re10k")
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    ref = MVSplatEncoder("re10k").eval()
    ref.load_state_dict(re10k_sd, strict=True)
    torch.manual_seed(0)
    B, H, W = 1, 32, 32
    images = torch.rand(B, 2, 3, H, W)
    K = torch.tensor([[0.9, 0.0, 0.5], [0.0, 1.2, 0.5], [0.0, 0.0, 1.0]]).expand(B, 2, 3, 3)
    c2w = torch.eye(4).repeat(B, 2, 1, 1)
    c2w[:, 1, 0, 3] = 0.2
    args = (images, K, c2w, torch.ones(B, 2), torch.full((B, 2), 50.0))
    a, b = enc(*args), ref(*args)
    assert torch.equal(a.means, b.means) and torch.equal(a.opacities, b.opacities) and torch.equal(a.quats, b.quats)
    # safetensors of the bare encoder state dict loads too
    from safetensors.torch import save_file

    st = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in re10k_sd.items()}, str(st))
    loaded = load_mvsplat(st, "re10k").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in re10k_sd.items())


def test_config_mismatch_names_file_and_fix(tmp_path: Path, re10k_sd) -> None:
    ckpt = tmp_path / "re10k.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in re10k_sd.items()}}, ckpt)
    with pytest.raises(SndError) as e:
        load_mvsplat(ckpt, "scannetpp")
    msg = str(e.value)
    assert str(ckpt) in msg and "'re10k'" in msg and "--mvsplat-config re10k" in msg
    pp = tmp_path / "scannetpp.pth"
    torch.save(_tiny_sd("scannetpp", 1), pp)
    assert identify_config(read_state_dict(pp)) == "scannetpp"
    with pytest.raises(SndError, match="--mvsplat-config scannetpp") as e:
        load_mvsplat(pp, "re10k")
    assert str(pp) in str(e.value)


def test_wrong_model_file(tmp_path: Path) -> None:
    dino = tmp_path / "dinov2_vits14.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 1370, 384),
                "patch_embed.proj.weight": torch.zeros(384, 3, 14, 14), "blocks.0.norm1.weight": torch.ones(384)}, dino)
    with pytest.raises(SndError) as e:
        load_mvsplat(dino, "scannetpp")
    assert str(dino) in str(e.value) and "does not look like an MVSplat encoder" in str(e.value)
    # a truncated/partial encoder: counts per preset are reported
    part = tmp_path / "partial.pth"
    sd = _tiny_sd("re10k", 0)
    torch.save(dict(list(sd.items())[:100]), part)
    with pytest.raises(SndError, match=r"re10k: 100/371 tensors match"):
        load_mvsplat(part, "re10k")
    with pytest.raises(SndError, match="missing MVSplat checkpoint"):
        load_mvsplat(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SndError, match="cannot read") as e:
        load_mvsplat(junk)
    assert str(junk) in str(e.value) and "downloading again" in str(e.value)  # the fix, not only the parse error


def test_pickled_objects_refused_with_resave_hint(tmp_path: Path, re10k_sd) -> None:
    ckpt = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in re10k_sd.items()},
                "hyper_parameters": argparse.Namespace(lr=1e-4)}, ckpt)
    with pytest.raises(SndError) as e:
        load_mvsplat(ckpt, "re10k")
    msg = str(e.value)
    assert str(ckpt) in msg and "snd.models.mvsplat.resave" in msg and "argparse.Namespace" in msg
    from snd.models.mvsplat.resave import resave_encoder_weights

    out = tmp_path / "enc.safetensors"
    assert resave_encoder_weights(ckpt, out) == 371
    enc = load_mvsplat(out, "re10k")
    assert torch.equal(enc.state_dict()["depth_predictor.to_disparity.2.bias"], re10k_sd["depth_predictor.to_disparity.2.bias"])


def test_random_weights_file_loads_as_the_random_init(tmp_path: Path) -> None:
    """`resave --random` writes the weights `--source mvsplat` uses with random init (benchmarks of the
    whole `snd precompute` command need a file for --mvsplat-ckpt)."""
    from snd.models.mvsplat.resave import main
    from snd.scaffold import create_source

    assert main(["--random", "re10k", str(tmp_path / "r.safetensors")]) == 0
    got = create_source("mvsplat", device="cpu", ckpt=tmp_path / "r.safetensors", config="re10k").net.state_dict()
    ref = create_source("mvsplat", device="cpu", random_init=True, config="re10k").net.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_resave_usage_names_both_forms(capsys) -> None:
    from snd.models.mvsplat.resave import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "SRC.ckpt DST.safetensors" in out and "--random CONFIG DST.safetensors" in out
    assert main(["only_one_arg"]) == 2 and "--random CONFIG" in capsys.readouterr().err
