"""Stage one's pipeline variants, alternated over ONE compiled MVSplat source (issue 20: >= 30 pairs/s).

`snd bench precompute` compiles MVSplat for every run (~70 s on an H200 even with inductor's caches warm), so an
A/B of two pipeline settings costs two compiles and lands on whatever the GPU's clocks did in between. Here the
dataset and the source are made once (`snd.bench.precompute.prepare`) and `measure` runs stage one into a fresh
store per variant, the variants alternating for `--rounds` rounds; a last round per variant traces the GPU
(`--busy`) for its busy fraction, all streams and each stream (tracing slows launches a little, so the traced
runs are not the timed ones).

`python scripts/gpu_precompute_ab.py [--pairs 96] [--rounds 2] [--variants thread inline] [--busy]`
prints one JSON line per run: variant, round, pairs/s over the timed batches, ms per pair per phase, busy.
Runs go in ABBA order (the variants reversed every other round), so a drift of the machine over the call (disk
write-back of earlier runs' stores, clocks) does not favour the variants that run later in a round: on 2026-12-06 an
H100 ran all three variants faster in the order they ran, in both rounds (`docs/bench/pipeline_ab4_h100.jsonl`).
Variants: thread (the default pipeline: on CUDA two builder threads), inline (`--no-operator-thread`: operators on
the main thread), no-operator (`--no-operator`: MVSplat and the store alone), chunk8 / chunk12
(`--operator-chunk 8/12`),
low-priority (`--no-operator-priority`: the operators' stream at MVSplat's priority), workers1 / workers2
(`--operator-workers 1/2`: builder threads, a stream each), or KEY=VALUE[,KEY=VALUE] overrides of
`snd.pipeline.config.PrecomputeConfig` (ints, 0/1 for flags, else strings).
``switch=SECONDS`` runs the defaults under `sys.setswitchinterval(SECONDS)` (Python's GIL hand-over interval, 5 ms by
default): on the 2-core CPU machine the shard writer beside a spinning Python thread took 392 ms per pair at 5 ms and
178 at 1 ms (`scripts/writer_rates.py`), and stage one's writer shares the GIL with the main and operator threads.
``process`` (`--writer process`: the shard writer in a child process), ``old-writer`` (`--writer thread`: the writer
thread, the default on CUDA before 2026-12-06), ``zarrs`` (the writer thread with `--writer-codecs zarrs`, zarrs-python's
Rust codec pipeline; on the device a wheel in `.whl/`) and ``process-zarrs`` (both) pick the shard writer.
``--builder FILE`` adds the variant ``builder-file``: the defaults with another version of
`snd/splat/operator_build.py` (e.g. `git show REV:snd/splat/operator_build.py > ab_before.py`) building the operators,
so a change to the builder is timed in the pipeline against the one before, in one process.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from dataclasses import fields, replace

from snd.bench.precompute import measure, prepare
from snd.pipeline.config import BenchPrecomputeConfig, PrecomputeConfig

PRESETS = {"thread": {"operator_thread": True}, "inline": {"operator_thread": False},
           "no-operator": {"operator": False}, "chunk8": {"operator_chunk": 8}, "chunk12": {"operator_chunk": 12},
           "low-priority": {"operator_priority": False}, "workers1": {"operator_workers": 1},
           "workers2": {"operator_workers": 2}, "process": {"writer": "process"},
           "zarrs": {"writer": "thread", "writer_codecs": "zarrs"}, "process-zarrs": {"writer": "process", "writer_codecs": "zarrs"},
           "old-writer": {"writer": "thread"}}
KEEP = ("pairs_per_s", "pairs_timed", "seconds_timed", "phase_ms_per_pair", "gpu_busy", "peak_mem_gib", "mb_per_pair",
        "operator_chunk", "operator_thread", "operator_workers", "operator_priority", "operator_kernels", "mvsplat_corr_kernel", "writer", "device_name")


def overrides(spec: str) -> dict:
    """A preset's overrides, or KEY=VALUE pairs (checked against PrecomputeConfig's fields)."""
    if spec == "builder-file" or spec.startswith("switch="):
        return {}
    if spec in PRESETS:
        return PRESETS[spec]
    names = {f.name: f for f in fields(PrecomputeConfig)}
    out = {}
    for kv in spec.split(","):
        k, _, v = kv.partition("=")
        if k not in names or not v:
            sys.exit(f"unknown variant {spec!r}: a preset ({', '.join(PRESETS)}) or KEY=VALUE of PrecomputeConfig")
        out[k] = bool(int(v)) if names[k].type in ("bool", bool) else int(v) if v.lstrip("-").isdigit() else v
    return out


@contextlib.contextmanager
def switch(spec: str):
    """The run under `sys.setswitchinterval` of the variant ``switch=SECONDS``, restored after."""
    keep = sys.getswitchinterval()
    sys.setswitchinterval(float(spec.partition("=")[2]))
    try:
        yield
    finally:
        sys.setswitchinterval(keep)


def builder_module(path: str):
    """Another version of `snd/splat/operator_build.py` (the file at `path`), loaded under its own name."""
    spec = importlib.util.spec_from_file_location("snd_builder_ab", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def builder(path: str | None):
    """Stage one's operators built by `build_operators` of the module at `path` for the duration (stage one looks
    it up in `snd.splat.operator` at each batch)."""
    import snd.splat.operator as op

    if not path:
        sys.exit("the variant builder-file needs --builder FILE")
    mod = builder_module(path)

    def build(*args, chunk=8, **kw):  # stage one's ChunkSize is our module's class: the other gets its size
        return mod.build_operators(*args, chunk=getattr(chunk, "size", chunk), **kw)

    keep, op.build_operators = op.build_operators, build
    try:
        yield
    finally:
        op.build_operators = keep


def schedule(variants: list[str], rounds: int, busy: bool) -> list[tuple[int, str, bool]]:
    """(round, variant, traced) of every run: the timed rounds in ABBA order, then one traced run per variant."""
    runs = [(r, v, False) for r in range(rounds) for v in (variants if r % 2 == 0 else variants[::-1])]
    return runs + ([(rounds, v, True) for v in variants] if busy else [])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=96, help="timed pairs per run (after two warm-up batches)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["thread", "inline"])
    ap.add_argument("--busy", action="store_true", help="one more run per variant, traced: the GPU's busy fraction")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--source", default="mvsplat")
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=880)
    ap.add_argument("--workdir", default="/tmp/snd-bench-pre-ab")
    ap.add_argument("--builder", default=None, help="another operator_build.py: adds the variant builder-file")
    a = ap.parse_args(argv)
    if a.builder and "builder-file" not in a.variants:
        a.variants.append("builder-file")
    cfg = BenchPrecomputeConfig(source=a.source, device=a.device, pairs=a.pairs, height=a.height, width=a.width,
                                workdir=a.workdir, images="lossless")
    pcfg, source = prepare(cfg)
    for r, v, traced in schedule(a.variants, a.rounds, a.busy):
        p = replace(pcfg, out=pcfg.out.with_name(f"cache-{v.replace('=', '-').replace(',', '_')}"), **overrides(v))
        ctx = builder(a.builder) if v == "builder-file" else switch(v) if v.startswith("switch=") else None
        with ctx or contextlib.nullcontext():
            res = measure(replace(cfg, gpu_busy=traced), p, source)
        print(json.dumps({"variant": v, "round": r, "traced": traced, **{k: res.get(k) for k in KEEP}}), flush=True)


if __name__ == "__main__":
    main()
