"""Build caches: defaults under the user's cache folder, user-set variables kept, reported by `snd doctor`."""
import os
from pathlib import Path

from snd.pipeline import buildcache


def test_defaults_follow_xdg_then_home(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    got = buildcache.configure(env)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "snd" / "inductor")
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "xdg" / "snd" / "torch_extensions")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "xdg" / "snd" / "triton")
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    assert {who for _, who in got.values()} == {"snd default"}
    env = {}
    buildcache.configure(env)
    assert env["TORCH_EXTENSIONS_DIR"] == str(Path.home() / ".cache" / "snd" / "torch_extensions")
    env = {"SND_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    buildcache.configure(env)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine" / "inductor")


def test_user_values_are_never_overridden(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": "/opt/ext", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "XDG_CACHE_HOME": str(tmp_path)}
    got = buildcache.configure(env)
    assert env["TORCH_EXTENSIONS_DIR"] == "/opt/ext" and got["TORCH_EXTENSIONS_DIR"] == ("/opt/ext", "set by you")
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "snd" / "inductor")
    assert buildcache.configure(env)["TORCHINDUCTOR_CACHE_DIR"][1] == "set by you"  # idempotent: now it is set


def test_gsplat_build_found_from_files_only(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert buildcache.gsplat_built(env) is None
    so = tmp_path / "py312_cu130" / "gsplat_cuda" / "gsplat_cuda.so"
    so.parent.mkdir(parents=True)
    so.write_bytes(b"x" * 2_000_000)
    assert buildcache.gsplat_built(env) == so.parent
    rows = dict(buildcache.report(env))
    assert rows["cache TORCH_EXTENSIONS_DIR"].startswith(f"{tmp_path} (set by you; gsplat") and "2 MB cached" in rows["cache TORCH_EXTENSIONS_DIR"]


def test_doctor_and_cli_start(tmp_path, monkeypatch):
    from snd.pipeline import doctor
    from tests._cli import run_cli

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "SND_CACHE_DIR"):
        monkeypatch.setenv(var, "")  # records the original value, so the CLI's settings are undone afterwards
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert run_cli(["data", "synth", "--help"]) == 0  # any command: the CLI start sets the defaults
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "snd" / "torch_extensions")
    (tmp_path / "snd" / "inductor" / "fxgraph").mkdir(parents=True)
    (tmp_path / "snd" / "inductor" / "fxgraph" / "g").write_bytes(b"x" * 3_000_000)
    rows = dict(doctor.report(tmp_path)["build_caches"])
    assert rows["cache TORCHINDUCTOR_CACHE_DIR"].startswith(f"{tmp_path / 'snd' / 'inductor'} (snd default;")
    assert rows["cache TORCHINDUCTOR_CACHE_DIR"].endswith("; 3 MB cached)")
    assert rows["cache TRITON_CACHE_DIR"].endswith("; empty: the first run builds it)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "own"))  # the user's own choice is named as such
    assert "(set by you;" in dict(doctor.report(tmp_path)["build_caches"])["cache TRITON_CACHE_DIR"]


def test_doctor_prints_whole_paths_in_80_columns(tmp_path):
    """Piped output is 80 columns wide: a missing dataset's paths and download hint fold, never end in "…"."""
    import io

    from rich.console import Console

    from snd.pipeline import doctor

    root = tmp_path / ("a_long_folder_name_" * 3) / "data"
    con = Console(file=io.StringIO(), width=80)
    rows = doctor.print_report(root, console=con)
    out = con.file.getvalue()
    assert "…" not in out
    assert "VOCdevkit" in dict(rows["datasets"])["voc"] and "dataset voc" in out


def test_doctor_finds_weights_of_every_backbone_family(tmp_path, monkeypatch):
    from snd.pipeline import doctor

    names = ["dinov2_vits14_pretrain.pth", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "dinov2_small_snd.pth",
             "re10k.ckpt", "models--timm--vit_small_patch16_dinov3.lvd1689m", "models--facebook--dinov3-vits16-pretrain-lvd1689m"]
    for n in names:
        (tmp_path / n).mkdir() if n.startswith("models--") else (tmp_path / n).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not weights")
    monkeypatch.setenv("SND_WEIGHTS", str(tmp_path))
    found = {name for name, where in doctor._weights() if where == str(tmp_path)}
    assert found == set(names)


def test_builds_are_announced_and_timed():
    import io

    import torch
    from rich.console import Console

    con = Console(file=io.StringIO(), width=200)
    with buildcache.announce(con, "building gsplat CUDA kernels", "first run only, ~90 s"):
        pass
    text = con.file.getvalue()
    assert "building gsplat CUDA kernels (first run only, ~90 s)…" in text and "building gsplat CUDA kernels: done in 0 s" in text
    before = buildcache.compile_seconds() or 0.0
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))  # Dynamo only: no C++ build on CPU
    assert buildcache.compile_seconds() > before
    assert buildcache.report_compile(con) > 0 and "torch.compile:" in con.file.getvalue()
