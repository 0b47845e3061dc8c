"""Helpers of stage one's tests: their small config, a scene group's files, and stage one killed with SIGKILL mid-way
through its second scene in a subprocess (the resume tests' start)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from snd.pipeline.config import PrecomputeConfig

H, W = 112, 168


def make_cfg(data: Path, out: Path, **kw) -> PrecomputeConfig:
    """Two pairs per batch, four per scene, two targets each, the depth source on the CPU at 112x168."""
    base = dict(data=data, out=out, height=H, width=W, pairs_per_scene=4, targets_per_pair=2, batch_pairs=2,
                device="cpu", source="depth", seed=0)
    return PrecomputeConfig(**{**base, **kw})


def store_files(root: Path, scene: str) -> dict[str, bytes]:
    """Every file of a scene group, by path within it: byte-for-byte comparisons of stores."""
    d = root / scene
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


_SCRIPT = textwrap.dedent("""
    import json, multiprocessing as mp, os, signal, sys
    from pathlib import Path
    from snd.pipeline.config import PrecomputeConfig
    from snd.stages.precompute import run
    data, out, extra = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    seen = []
    before = set(Path("/dev/shm").glob("snd-writer-*"))  # other runs' (a test that failed earlier)
    def on_batch(scene, n):
        if scene not in seen:
            seen.append(scene)
        if len(seen) == 2 and n >= 2:  # mid-way through the second scene
            print("children", *[p.pid for p in mp.active_children()], flush=True)  # a writer process, if any
            print("spill", *(set(Path("/dev/shm").glob("snd-writer-*")) - before), flush=True)  # ... and its spill folder
            os.kill(os.getpid(), signal.SIGKILL)
    run(PrecomputeConfig(data=data, out=out, height=112, width=168, pairs_per_scene=4, targets_per_pair=2,
                         batch_pairs=2, device="cpu", source="depth", seed=0, **extra), progress=False, on_batch=on_batch)
""")


def kill_mid_second_scene(data: Path, out: Path, **cfg) -> tuple[subprocess.CompletedProcess, list[int], list[Path]]:
    """Run stage one (the tests' small config, plus `cfg`) until SIGKILL; returns the process, the pids of the child
    processes it had when it was killed and the writer's spill folders in /dev/shm then."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(data), str(out), json.dumps(cfg)], capture_output=True,
                          text=True, timeout=300)
    def words(tag: str) -> list[str]:
        return next((x for x in proc.stdout.splitlines() if x.startswith(tag)), tag).split()[1:]

    return proc, [int(x) for x in words("children")], [Path(x) for x in words("spill")]
