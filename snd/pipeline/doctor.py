"""`snd doctor`: what this machine has, and what a long run would miss, before it starts.

Reports versions (torch/CUDA, timm, peft, zarr, gsplat), GPUs and memory, whether gsplat's CUDA extension
is already built (without triggering the ~90 s JIT build), where the build caches live (`snd.pipeline.buildcache`)
and what they hold, and which weights and datasets are found where.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from snd.pipeline import buildcache

WEIGHT_DIRS = ("$SND_WEIGHTS", "~/.cache/torch/hub/checkpoints", "~/.cache/huggingface/hub", "weights")
# every family of the backbone registry (docs/backbones.md), the released SnD files and MVSplat checkpoints
WEIGHT_GLOBS = ("dinov2_*.pth", "*dinov2*.safetensors", "dinov3_*.pth", "*dinov3*.safetensors", "*snd*.pth", "*.ckpt",
                "models--timm--vit_*dinov2*", "models--timm--vit_*dinov3*", "models--facebook--dinov3*")


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - report, never fail
        return f"missing ({type(e).__name__})"


def _gsplat_status() -> str:
    """From files only: importing `gsplat.cuda._backend` would itself start the JIT build when none exists."""
    if importlib.util.find_spec("gsplat") is None:
        return "not installed (the torch renderer is used; fine on CPU)"
    if importlib.util.find_spec("gsplat.csrc") is not None:
        return "installed with a prebuilt CUDA extension"
    built = buildcache.gsplat_built()
    if built is not None:
        return f"installed, CUDA extension built (in {built})"
    return "installed; CUDA extension not built yet (first GPU use compiles it, ~90 s)" if torch.cuda.is_available() \
        else "installed; needs CUDA"


def _kernel_status(module: str) -> str:
    """`status()` of one of snd's kernel modules (the operators' CUDA kernels, MVSplat's correlation kernel)."""
    try:
        return importlib.import_module(module).status()
    except Exception as e:  # noqa: BLE001 - report, never fail
        return f"unknown ({type(e).__name__}: {e})"


def _weights() -> list[tuple[str, str]]:
    rows = []
    for d in WEIGHT_DIRS:
        path = Path(os.path.expandvars(os.path.expanduser(d)))
        if "$" in str(path) or not path.is_dir():
            continue
        hits = sorted({h for g in WEIGHT_GLOBS for h in path.glob(g)})
        rows += [(h.name, str(h.parent)) for h in hits[:20]]
    return rows


def _datasets(root: Path) -> list[tuple[str, str]]:
    from snd.eval import datasets as D

    return [(name, status) for name, status in D.available(root).items()]


def report(data_root: Path = Path("data")) -> dict:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{p.name}, {p.total_memory / 2**30:.0f} GiB")
    return {
        "versions": {"python": ".".join(map(str, __import__("sys").version_info[:3])), "torch": torch.__version__,
                     "cuda": torch.version.cuda or "none (CPU build)", "timm": _version("timm"), "peft": _version("peft"),
                     "zarr": _version("zarr"), "h5py": _version("h5py"), "safetensors": _version("safetensors"),
                     "trimesh": _version("trimesh"), "embreex": _version("embreex")},
        "gpus": gpus or ["none: stage one/two run on CPU (tests and the demo only)"],
        "gsplat": _gsplat_status(),
        "operator_kernels": _kernel_status("snd.splat.kernels"),
        "mvsplat_corr_kernel": _kernel_status("snd.models.mvsplat.corr_kernel"),
        "build_caches": buildcache.report(),
        "weights": _weights(),
        "datasets": _datasets(Path(data_root)),
    }


def print_report(data_root: Path = Path("data"), console=None) -> dict:
    """Print `report` as a table. Long cells fold instead of ending in "…": a missing dataset's file paths
    and download hint are the point of the row, and piped output is only 80 columns wide."""
    from rich.console import Console
    from rich.table import Table

    r = report(data_root)
    con = console or Console()
    t = Table(title="snd doctor", show_lines=False)
    t.add_column("what", overflow="fold")
    t.add_column("status", overflow="fold")
    for k, v in r["versions"].items():
        t.add_row(k, v)
    for g in r["gpus"]:
        t.add_row("gpu", g)
    t.add_row("gsplat", r["gsplat"])
    t.add_row("snd operator kernels", r["operator_kernels"])
    t.add_row("MVSplat correlation kernel", r["mvsplat_corr_kernel"])
    for name, status in r["build_caches"]:
        t.add_row(name, status)
    for name, where in r["weights"] or [("weights", "none found in " + ", ".join(WEIGHT_DIRS) + " (pass --weights)")]:
        t.add_row(name, where)
    for name, status in r["datasets"]:
        t.add_row(f"dataset {name}", status)
    con.print(t)
    return r
