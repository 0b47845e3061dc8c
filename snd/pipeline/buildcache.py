"""Where the first run's builds are kept, so that the second run starts in seconds.

Why: a first GPU run compiles gsplat's CUDA extension (~90 s, a JIT build into ``TORCH_EXTENSIONS_DIR``)
and torch.compile's graphs for MVSplat and the distillation fast path (~1-2 min; Inductor's FX graph
cache and generated kernels in ``TORCHINDUCTOR_CACHE_DIR``, Triton's in ``TRITON_CACHE_DIR``). Inductor's
own default is ``/tmp/torchinductor_<user>``, which a reboot or a fresh container loses. `configure` points
the three at one folder of the user's cache, ``$SND_CACHE_DIR`` or ``$XDG_CACHE_HOME/snd`` or
``~/.cache/snd``, and never overrides a variable the user set. The CLI calls it once at start; `snd doctor`
reports it; the stages announce each build (`announce`) and how long it took.
"""
from __future__ import annotations

import importlib.util
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, MutableMapping

# variable -> sub-folder of the snd cache; what is built there
CACHE_VARS = {
    "TORCHINDUCTOR_CACHE_DIR": ("inductor", "torch.compile graphs (MVSplat, distillation fast path)"),
    "TRITON_CACHE_DIR": ("triton", "Triton GPU kernels (torch.compile's and MVSplat's correlation kernel)"),
    "TORCH_EXTENSIONS_DIR": ("torch_extensions", "gsplat's CUDA extension (JIT build)"),
}
SWITCHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}  # on by default in recent torch; pinned, never overridden
_SET_BY_SND: dict[str, str] = {}  # what `configure` set in os.environ (so the doctor can tell it from the user's)


def cache_root(env: MutableMapping[str, str] | None = None) -> Path:
    """``$SND_CACHE_DIR``, else ``$XDG_CACHE_HOME/snd``, else ``~/.cache/snd``."""
    env = os.environ if env is None else env
    if env.get("SND_CACHE_DIR"):
        return Path(env["SND_CACHE_DIR"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "snd"


def configure(env: MutableMapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Set each build-cache variable the user left unset to its folder under `cache_root`.

    Call it before anything imports timm: that import already fixes Inductor's cache folder (torch then
    writes its /tmp default into the environment). Returns {variable: (value, "snd default" | "set by
    you")}. Folders are created lazily by their users.
    """
    live = env is None
    env = os.environ if env is None else env
    root = cache_root(env)
    out = {}
    for var, (sub, _) in CACHE_VARS.items():
        if env.get(var):
            out[var] = (env[var], "snd default" if live and _SET_BY_SND.get(var) == env[var] else "set by you")
        else:
            env[var] = str(root / sub)
            out[var] = (env[var], "snd default")
            if live:
                _SET_BY_SND[var] = env[var]
    for var, value in SWITCHES.items():
        env.setdefault(var, value)
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def report(env: MutableMapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Rows (what, status) for `snd doctor`: each cache's folder, who chose it, and what it holds."""
    shown = configure(dict(os.environ if env is None else env))
    if env is None:  # the live environment: name what snd itself set
        shown = {v: (val, "snd default" if _SET_BY_SND.get(v) == val else who) for v, (val, who) in shown.items()}
    rows = []
    for var, (value, who) in shown.items():
        size = _size(Path(value))
        held = f"{size / 1e6:.0f} MB cached" if size else "empty: the first run builds it"
        rows.append((f"cache {var}", f"{value} ({who}; {CACHE_VARS[var][1]}; {held})"))
    return rows


def gsplat_built(env: MutableMapping[str, str] | None = None) -> Path | None:
    """The folder of a built gsplat JIT extension under ``TORCH_EXTENSIONS_DIR``, or None (files only:
    importing ``gsplat.cuda._backend`` would itself start the build)."""
    env = os.environ if env is None else env
    cache = Path(env.get("TORCH_EXTENSIONS_DIR") or configure(dict(env))["TORCH_EXTENSIONS_DIR"][0])
    built = sorted(cache.rglob("gsplat_cuda.so")) if cache.is_dir() else []
    return built[0].parent if built else None


@contextmanager
def announce(console, what: str, expect: str) -> Iterator[None]:
    """Print "<what> (<expect>)..." before a build and "<what>: done in N s" after it."""
    console.print(f"[yellow]{what}[/] ({expect})…")
    t0 = time.perf_counter()
    yield
    console.print(f"{what}: done in {time.perf_counter() - t0:.0f} s")


def build_gsplat(console) -> bool:
    """Build gsplat's CUDA extension now, announced, when it is installed without a prebuilt one and not
    built yet (instead of a silent ~90 s stall inside the first render). True if it was built here."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("gsplat") is None:
        return False
    if importlib.util.find_spec("gsplat.csrc") is not None or gsplat_built() is not None:
        return False
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default")
    with announce(console, "building gsplat CUDA kernels", f"first run only, ~90 s; kept in {where}"):
        importlib.import_module("gsplat.cuda._backend")
    return True


def compile_seconds() -> float | None:
    """Seconds torch.compile (Dynamo + Inductor) spent in this process so far, or None if unknown."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return float(sum(float(v) for n, v in zip(names, values) if n == "_compile.compile_inner"))  # Dynamo's whole frame compile, Inductor inside it
    except Exception:  # noqa: BLE001 - a private API: report nothing rather than fail a run
        return None


def announce_compile(console, what: str, expect: str = "~1-2 min on a first run") -> None:
    """Say before the first steps that torch.compile builds `what` there (compilation is lazy: it runs
    inside the first call), how long it takes, and where it is kept; `report_compile` says how long it took."""
    where = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default")
    console.print(f"[yellow]compiling {what}[/] with torch.compile in the first steps ({expect}; "
                  f"seconds on later runs: kept in {where})…")


def report_compile(console) -> float | None:
    """Print and return the seconds torch.compile spent in this process (None: none or unknown)."""
    s = compile_seconds()
    if s:
        console.print(f"torch.compile: {s:.0f} s compiling in this run")
    return s or None
