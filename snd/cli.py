"""The `snd` command line: parsing, rich output and exit codes only; the work lives in `snd.stages`.

Exit codes: 0 ok, 1 the job ran but some items failed (e.g. scenes in precompute), 2 bad input
(an `SndError`: missing file, wrong format, bad option; or a file-system refusal the user fixes, such as
a file where --out should be a folder or a full disk: `snd.errors.user_os_error`).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any  # noqa: F401

import typer
from rich.console import Console

from snd.errors import SndError, user_os_error
from snd.pipeline import config as C
from snd.pipeline.options import command_from_config

console = Console(stderr=True)

app = typer.Typer(
    name="snd",
    help="Splat and Distill: 3D-consistent DINOv2 features from cached Gaussian scaffolds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: generate procedural ScanNet++-layout scenes (`snd data synth`).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (JSON out): precompute, distill, eval; project = the paper-scale projection from their JSONs.", no_args_is_help=True)
cache_app = typer.Typer(help="Know and keep your caches: info | verify | gc for scaffold stores and evaluation caches; add-operators to a scaffold store.",
                        no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(cache_app, name="cache")


def _exit_with(code: int) -> None:
    if code:
        raise typer.Exit(code)


# ---- data --------------------------------------------------------------------------------------
def _synth(cfg: C.SynthConfig) -> None:
    from snd.data.synth import generate_dataset

    names = generate_dataset(cfg, progress=True)
    console.print(f"[green]wrote {len(names)} scenes[/] to {cfg.out}")


command_from_config(data_app, "synth", C.SynthConfig, _synth,
                    help="Generate procedural rooms in the raw ScanNet++ v2 layout (images, mesh, segments, poses).")


# ---- stage one ---------------------------------------------------------------------------------
def _precompute(cfg: C.PrecomputeConfig) -> None:
    from snd.stages.precompute import run

    summary = run(cfg)
    _exit_with(1 if summary.failed else 0)


command_from_config(app, "precompute", C.PrecomputeConfig, _precompute,
                    help="Stage one: predict the Gaussian scaffold of every context pair once and store it in Zarr shards.")


# ---- stage two ---------------------------------------------------------------------------------
def _distill(cfg: C.DistillConfig) -> None:
    from snd.stages.distill import run

    _exit_with(130 if run(cfg).interrupted else 0)  # 130: stopped by Ctrl-C (after saving), as a shell reports it


command_from_config(app, "distill", C.DistillConfig, _distill,
                    help="Stage two: distill 3D-consistent features into a LoRA student, streaming the cached scaffolds.")


# ---- evaluation --------------------------------------------------------------------------------
TASKS = ("all", "depth", "normals", "seg", "corr")


def _eval(cfg: C.EvalConfig, task: str) -> None:
    from snd.stages.evaluate import run

    if task not in TASKS:
        raise SndError(f"unknown eval task {task!r}; choose one of {', '.join(TASKS)}")
    tasks = ["depth", "normals", "seg", "corr"] if task == "all" else [task]
    run(cfg, tasks=tasks)


_task_param = inspect.Parameter(
    "task", inspect.Parameter.POSITIONAL_OR_KEYWORD,
    default=typer.Argument("all", help=f"Probe to run: {' | '.join(TASKS)}."), annotation=str,
)
command_from_config(app, "eval", C.EvalConfig, _eval, extra=[_task_param],
                    help="Frozen-feature probes: depth, surface normals, semantic segmentation, multi-view correspondence.")


# ---- use the features ----------------------------------------------------------------------------
def _export(cfg: C.ExportConfig, run: str) -> None:
    from snd.export import export_run

    res = export_run(run, cfg.out, which=cfg.which, fmt=cfg.format, push=cfg.push)
    console.print(f"[green]exported[/] {res['architecture']} to {res['out']}: {', '.join(res['files'])}")


_run_param = inspect.Parameter("run", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               default=typer.Argument(..., help="Run directory (or one of its checkpoints)."), annotation=str)
command_from_config(app, "export", C.ExportConfig, _export, extra=[_run_param],
                    help="Export a run's backbone (LoRA merged) for plain timm / the HF hub, plus a model card.")


def _features(cfg: C.FeaturesConfig, images: list[str]) -> None:
    from pathlib import Path

    from snd.stages.features import run

    res = run(cfg, [Path(p) for p in images])
    console.print(f"[green]features[/] ({res['dim']} x {res['grid'][0]}x{res['grid'][1]}) -> {res['out']}: "
                  f"{', '.join(res['files'])}")


_images_param = inspect.Parameter("images", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  default=typer.Argument(..., help="Image files (two views of a scene also get matches.png)."),
                                  annotation=list[str])
command_from_config(app, "features", C.FeaturesConfig, _features, extra=[_images_param],
                    help="Dense features of images (npz) and pictures: joint PCA colours, K-means segments, cross-view matches.")


def _doctor(cfg: C.DoctorConfig) -> None:
    from snd.pipeline.doctor import print_report

    print_report(cfg.data_root)


command_from_config(app, "doctor", C.DoctorConfig, _doctor,
                    help="Print the environment (torch/CUDA, gsplat build, GPUs) and which weights and datasets are found where.")


# ---- caches --------------------------------------------------------------------------------------
def _print_json(obj: Any) -> None:
    import json

    typer.echo(json.dumps(obj, indent=1, default=str))


def _cache_info(cfg: C.CacheInfoConfig, path: str) -> None:
    from snd.cache.info import cache_info, print_info

    info = cache_info(path)
    _print_json(info) if cfg.json else print_info(info, Console())


def _cache_verify(cfg: C.CacheVerifyConfig, path: str) -> None:
    from snd.cache.verify import verify_store

    rep = verify_store(path, jobs=cfg.jobs, fix=cfg.fix, progress=not cfg.json)
    if cfg.json:
        _print_json(rep.to_dict())
    else:
        for p in rep.problems:
            console.print(f"[red]bad[/] {p}")
        console.print(f"{'[green]ok[/]' if rep.ok else '[red]corrupted[/]'}: {rep.scenes} scenes, {rep.arrays} arrays, "
                      f"{rep.rows} rows checksummed, {rep.bytes / 1e6:.0f} MB read"
                      + (f"; {len(rep.bad_scenes)} bad scene(s): {', '.join(rep.bad_scenes)}" if rep.problems else "")
                      + (f"; {rep.incomplete} incomplete scene(s) not checked" if rep.incomplete else ""))
        if rep.removed:
            console.print(f"removed {', '.join(rep.removed)}: rerun the same `snd precompute` to redo only these")
        elif rep.problems:
            console.print(f"fix: snd cache verify {path} --fix, then rerun the same `snd precompute`")
    _exit_with(0 if rep.ok else 1)


def _cache_gc(cfg: C.CacheGcConfig, path: str) -> None:
    from snd.cache.gc import gc

    rep = gc(path, keep=cfg.keep, yes=cfg.yes)
    if cfg.json:
        _print_json(rep.to_dict())
        return
    for c in rep.candidates:
        console.print(f"{'removed' if rep.removed else 'would remove'} {c.path} ({c.bytes / 1e6:.1f} MB): {c.why}")
    if rep.kept:
        console.print(f"kept feature caches: {', '.join(rep.kept)}")
    verb = "freed" if rep.removed else "would free"
    console.print(f"{len(rep.candidates)} item(s), {verb} {rep.bytes / 1e6:.1f} MB"
                  + ("" if rep.removed or not rep.candidates else "; pass --yes to remove them"))


_path_param = inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=typer.Argument(..., help="A scaffold store (`snd precompute --out`) or an "
                                                                 "evaluation cache (`snd eval` <out>/features)."),
                                annotation=str)
command_from_config(cache_app, "info", C.CacheInfoConfig, _cache_info, extra=[_path_param],
                    help="What a cache holds: settings, scenes complete/incomplete, pairs, MB per pair, runs; or feature caches per backbone key.")
command_from_config(cache_app, "verify", C.CacheVerifyConfig, _cache_verify, extra=[_path_param],
                    help="Read every chunk of a scaffold store and check every checksum; exit 1 naming each bad scene/pair/array.")
def _cache_add_operators(cfg: C.CacheAddOperatorsConfig, src: str) -> None:
    from snd.stages.precompute.add_operators import add_operators

    rep = add_operators(src, cfg)
    console.print(f"[green]done[/]: {rep['out']}: {rep['scenes_written']} scene(s) written, {rep['scenes_already_complete']} "
                  f"already complete; {rep['pairs']} pairs in {rep['seconds']:.1f} s on {rep['device']}; "
                  f"{rep['mb_per_pair']:.2f} MB per pair. Train with: snd distill --shards {rep['out']}")


_src_param = inspect.Parameter("src", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               default=typer.Argument(..., help="The scaffold store to read (`snd precompute --out`); never modified."),
                               annotation=str)
command_from_config(cache_app, "add-operators", C.CacheAddOperatorsConfig, _cache_add_operators, extra=[_src_param],
                    help="A new store with SRC's arrays and frames plus transfer operators built from SRC alone (no dataset, no MVSplat): "
                         "the fast path for stores written with --no-operator, by an older builder or for another backbone size.")
command_from_config(cache_app, "gc", C.CacheGcConfig, _cache_gc, extra=[_path_param],
                    help="List (--yes: remove) incomplete scenes' leftovers, killed runs' temp files, feature caches of weights not kept.")


# ---- demo --------------------------------------------------------------------------------------
def _demo(cfg: C.DemoConfig) -> None:
    from snd.pipeline.demo import run_demo

    run_demo(cfg.out, scenes=cfg.scenes, iters=cfg.iters, seed=cfg.seed)


command_from_config(app, "demo", C.DemoConfig, _demo,
                    help="The whole pipeline on built-in procedural data with small models: synth -> precompute -> distill -> eval.")


# ---- benchmarks --------------------------------------------------------------------------------
def _bench_precompute(cfg: C.BenchPrecomputeConfig) -> None:
    from snd.bench.precompute import bench

    bench(cfg)


def _bench_distill(cfg: C.BenchDistillConfig) -> None:
    from snd.bench.distill import bench

    bench(cfg)


command_from_config(bench_app, "precompute", C.BenchPrecomputeConfig, _bench_precompute,
                    help="Stage-one pairs/s and MB/pair (JSON).")
command_from_config(bench_app, "distill", C.BenchDistillConfig, _bench_distill,
                    help="Stage-two it/s, ms per phase and peak memory (JSON).")


def _bench_eval(cfg: C.BenchEvalConfig) -> None:
    from snd.bench.eval import bench

    bench(cfg)


command_from_config(bench_app, "eval", C.BenchEvalConfig, _bench_eval,
                    help="`snd eval all` time at the real datasets' sizes: measured rates, projected hours (JSON).")


def _bench_project(cfg: C.BenchProjectConfig) -> None:
    from snd.bench.project import project

    project(cfg)


command_from_config(bench_app, "project", C.BenchProjectConfig, _bench_project,
                    help="Paper-scale workflow (280 scenes, 50k pairs, 50k steps, eval suite) on one H100: hours per stage and disk from the measured bench JSONs (JSON).")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: SndError (and the file-system refusals of `user_os_error`) -> one red line + exit 2;
    usage errors are typer's; bugs keep tracebacks.

    Build caches (torch.compile, Triton, gsplat's JIT build) default to the user's cache folder first
    (`snd.pipeline.buildcache`; variables the user set are kept), so a second run starts in seconds. `ast.parse`
    is serialized for the process (`snd.pipeline.compat`: CPython 3.11/3.12 cannot run it in two threads at once,
    and stage one's and the evaluation's threads reach it through numpy and trimesh)."""
    from snd.pipeline import buildcache
    from snd.pipeline.compat import serialize_ast_parse

    buildcache.configure()
    serialize_ast_parse()
    try:
        app(args=argv)
    except SndError as e:
        _fail(e)
    except OSError as e:  # a file where a folder should be, no permission, disk full: the user's to fix
        err = user_os_error(e)
        if err is None:
            raise
        _fail(err)


def _fail(e: SndError) -> None:
    """The one error line (and its fix) on stderr, exit 2."""
    from rich.markup import escape

    # the text is the user's paths and our words, not markup: "[/data/x]" is no closing tag
    console.print(f"[bold red]error:[/] {escape(str(e))}")
    sys.exit(2)


if __name__ == "__main__":
    main()
