"""`snd eval`: frozen-feature probes of a model (and a baseline) on every dataset found, with reports.

For each backbone: cache the tokens (`snd.eval.features`) and training targets (`snd.eval.targets`) of every
available (task, dataset), train all of its linear probes together (`snd.eval.probes.train.train_probes`:
one CUDA stream each, shared rows where two tasks read one dataset; each probe ends as it would alone),
evaluate each (`snd.eval.metrics`), and write

    <out>/results.json                    every record (metrics, sizes, timings) + what was not evaluated
    <out>/results.md, results_<task>.md   markdown tables: model | baseline | Δ | paper numbers
    <out>/figures/<task>_<dataset>.png    predictions next to GT (correspondence: recall curves)
    <out>/results/<model>/<dataset>_<task>.json   one record per finished (model, dataset, task)
    <out>/results/trivial-<hash>/<dataset>_<task>.json   the constant-predictor floor (`snd.eval.trivial`)
    <out>/probes/<model>/<dataset>_<task>.safetensors   probe checkpoints (resumable)

Resumable: finished (model, dataset, task) records are reused and a half-trained probe resumes, as long as
the protocol (iters, batch, image size, subset, caching, seed) is the same: `<model>` is the model's feature
key plus a hash of that protocol. A missing dataset is a note naming what to download and where to put it;
the stage fails (SndError, exit 2) only when nothing at all could be evaluated.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snd.cache.inuse import hold_in_use
from snd.errors import SndError
from snd.pipeline.config import EvalConfig, save_config, to_jsonable
from snd.stages.eval_corr import _eval_corr
from snd.stages.eval_outputs import _clean, _figures, _save_samples, _write_json
from snd.stages.eval_plan import (TASK_TO_DATASET_TASK, _depth_range, _eval_trivial, _plan, _protocol, _splits,
                                  _trivial_folder, probe_input_sized, trivial_train_set, val_hw)

log = logging.getLogger(__name__)

__all__ = ["run", "TASK_TO_DATASET_TASK"]

EXTRACT_BATCH = 32  # images per backbone forward when caching tokens


class _Role:
    """One backbone under evaluation ("model" or "baseline"), loaded on first use."""

    def __init__(self, role: str, name: str, weights: Path | None, cfg: EvalConfig):
        self.role, self.name, self.weights, self.cfg = role, name, weights, cfg
        self.label = Path(name).name if Path(name).exists() else name
        self._net: torch.nn.Module | None = None
        self._fingerprint = ""

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            from snd.eval.features import load_eval_backbone

            self._net = load_eval_backbone(self.name, weights=self.weights, init=self.cfg.init, seed=self.cfg.seed)
        return self._net

    @property
    def key(self) -> str:
        """The feature-cache key: weights (hashed once), input size (`cfg`'s, once `probe_input_sized` has set
        it), precision and patch."""
        from snd.eval.features import key_from_fingerprint, weights_fingerprint

        self._fingerprint = self._fingerprint or weights_fingerprint(self.net)
        return key_from_fingerprint(self._fingerprint, (self.cfg.img_height, self.cfg.img_width),
                                    self.cfg.extract_precision, _patch(self))

    def folder(self) -> str:
        proto = hashlib.sha256(json.dumps(_protocol(self.cfg), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.key}-{proto}"

    def size(self) -> str | None:
        from snd.eval.paper import backbone_size
        from snd.models.backbone import _unwrap, patch_size

        vit = _unwrap(self.net)
        return backbone_size(int(vit.embed_dim), patch_size(vit))


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


@dataclass
class _Prepared:
    """One (role, task, dataset) probe ready to train: cached rows, head, recipe (see `_prepare_probe`)."""

    task: str
    name: str
    probe: Any
    spec: Any
    data_tr: Any
    data_va: Any
    ckpt: Path
    trivial: dict | None
    val_grid: tuple[int, int]  # patch grid of the validation tokens (the paper fixes some sizes; 1x1 heads)
    train_grid: tuple[int, int]  # patch grid of the training tokens
    self_augmenting: bool = False  # the training dataset augments its own items (GeoNet, live backbone)


def _prepare_probe(role: _Role, task: str, name: str, cfg: EvalConfig, device: torch.device, folder: Path,
                   progress, *, with_trivial: bool = False) -> _Prepared:
    """Cache the tokens and targets of one (task, dataset) and build its probe; with `with_trivial`, also the
    trivial baseline of (task, dataset) (it reads the same cached targets training reads)."""
    from snd.eval import datasets as D
    from snd.eval.features import ensure_features
    from snd.eval.probes import DepthProbe, NormalProbe, ProbeData, SegProbe, default_spec
    from snd.eval.targets import ensure_targets

    hw = (cfg.img_height, cfg.img_width)
    _, dim = _grid_dim(role, hw)  # also checks the input size against the patch size
    train_ds, val_ds, idx_tr, idx_va = _splits(task, name, cfg, _patch(role))
    vhw = val_hw(cfg, name, task, _patch(role))
    vgrid, _ = _grid_dim(role, vhw)
    # a training set that augments its own items (the paper's GeoNet normals) runs the backbone live; its input
    # size, like a paper-fixed one (KITTI's whole KB crop), is the training set's own
    self_aug = bool(getattr(train_ds, "self_augmenting", False))
    thw = tuple(train_ds.img_hw)
    tgrid, _ = _grid_dim(role, thw)
    stores, targets = {}, None
    flip_test = cfg.protocol == "paper" and task == "depth"
    if cfg.feature_cache:
        from snd.eval.protocol import FlippedImages

        cache_dir = cfg.feature_cache_dir or cfg.out / "features"
        sources = ([] if self_aug else [("train", train_ds, idx_tr, thw)])
        if not getattr(val_ds, "slide", False):  # the sliding-window test runs the backbone live per window
            sources.append(("val", val_ds, idx_va, vhw))
        if flip_test:  # the flip test's second pass, cached like the first
            sources.append(("val_flip", FlippedImages(val_ds), idx_va, vhw))
        for split, ds, idx, shw in sources:
            bar = progress.add_task(f"{role.label} · {name} {split} features", total=len(idx), info="")
            # a split at another input size (the paper's fixed sizes) gets its own store
            # and frames made another way than the default (FiT3D's cubic ScanNet++ frames) their own store
            dname = (name if shw == hw else f"{name}@{shw[0]}x{shw[1]}") + getattr(ds, "frame_tag", "")
            stores[split] = ensure_features(role.net, ds, cache_dir=cache_dir, dataset_name=dname, split=split,
                                            img_hw=shw, indices=idx, key=role.key, batch=EXTRACT_BATCH, device=device,
                                            num_workers=cfg.num_workers, precision=cfg.extract_precision,
                                            progress=lambda d, t, b=bar: progress.update(b, completed=d))
            progress.remove_task(bar)
        # the targets too, once per (dataset, split, task, size): epochs then read raw chunks, not images
        if not self_aug:
            bar = progress.add_task(f"{name} train {task} targets", total=len(idx_tr), info="")
            targets = ensure_targets(train_ds, idx_tr, task, cache_dir=cache_dir, dataset_name=name, split="train",
                                     img_hw=thw, num_workers=cfg.num_workers,
                                     progress=lambda d, t, b=bar: progress.update(b, completed=d))
            progress.remove_task(bar)
    # a self-augmenting set is never held in RAM: every epoch draws fresh augmentations
    data_tr = ProbeData(train_ds, idx_tr, task, stores.get("train"), targets=targets,
                        **({"memory_mb": 0.0} if self_aug else {}))
    data_va = ProbeData(val_ds, idx_va, task, stores.get("val"), with_image=True, flip_store=stores.get("val_flip"))
    # the constant predictor is fit on the un-augmented labels where the training set augments its items
    tri_tr = ProbeData(trivial_train_set(train_ds), idx_tr, task) if self_aug else data_tr
    trivial = _eval_trivial(task, name, tri_tr, data_va, cfg.protocol) if with_trivial else None
    torch.manual_seed(cfg.seed)
    if task == "depth":
        lo, hi = _depth_range(name)
        probe = DepthProbe(dim, min_depth=lo, max_depth=hi)
    elif task == "normals":  # Probe3D's GeoNet loss mask is depth > 0 (NaN targets elsewhere)
        probe = NormalProbe(dim, mask="finite") if self_aug else NormalProbe(dim)
    else:
        k = D.num_classes(name)
        if not k:
            raise SndError(f"{name}: unknown number of segmentation classes")
        probe = SegProbe(dim, num_classes=k, ignore_index=255)
    spec = default_spec(task, len(idx_tr)).with_overrides(iters=cfg.iters, batch=cfg.batch, lr_scale=cfg.lr_scale)
    spec.beta1_cycle = cfg.protocol == "paper" and task == "depth"  # the depth config's OneCycle momentum
    # Probe3D's "trainval" loader keeps file order; mmseg's and the depth Toolbox's loaders shuffle
    spec.shuffle = not getattr(train_ds, "file_order", False)
    return _Prepared(task, name, probe, spec, data_tr, data_va, folder / f"{name}_{task}.safetensors", trivial, vgrid,
                     tgrid, self_aug)


def _patch(role: _Role) -> int:
    from snd.models.backbone import _unwrap, patch_size

    return patch_size(_unwrap(role.net))


def _grid_dim(role: _Role, hw: tuple[int, int]) -> tuple[tuple[int, int], int]:
    from snd.models.backbone import _unwrap

    vit = _unwrap(role.net)
    p = _patch(role)
    if hw[0] % p or hw[1] % p:
        raise SndError(f"probe input {hw[0]}x{hw[1]} is not a multiple of the patch size {p}",
                       hint=f"use --img-height {hw[0] // p * p} --img-width {hw[1] // p * p}")
    return (hw[0] // p, hw[1] // p), int(vit.embed_dim)


def _train_and_evaluate(role: _Role, prepared: list[_Prepared], cfg: EvalConfig, device: torch.device,
                        progress) -> dict[tuple[str, str], tuple[dict, list[dict]]]:
    """Train every prepared probe of one backbone together (`train_probes`: one CUDA stream each, shared
    rows where two tasks read the same dataset), then evaluate each: (task, dataset) -> (record, samples)."""
    from snd.eval.features import final_norm_params
    from snd.eval.probes import evaluate_probe
    from snd.eval.probes.train import ProbeJob, train_probes

    if not prepared:
        return {}
    norm = final_norm_params(role.net)
    live = None if cfg.feature_cache else role.net
    jobs, bars = [], []
    for p in prepared:
        bar = progress.add_task(f"{role.label} · {p.name} {p.task} probe", total=p.spec.iters, info="")
        bars.append(bar)
        jobs.append(ProbeJob(p.probe, p.data_tr, p.spec, p.ckpt, ckpt_every=max(min(2000, p.spec.iters // 4), 1),
                             progress=lambda s, t, l, b=bar: progress.update(b, completed=s, info=f"loss {l:.4f}"),
                             augment=False if p.self_augmenting else None))
    # one `train_probes` call per training grid (the paper's GeoNet normals train at 490x490, live)
    stats: list[dict] = [{}] * len(prepared)
    t0 = time.perf_counter()
    for grid in sorted({p.train_grid for p in prepared}):
        idx = [i for i, p in enumerate(prepared) if p.train_grid == grid]
        n_live = sum(prepared[i].data_tr.store is None for i in idx)
        # --num-workers counts processes in all: probes training live together share them
        workers = max(1, cfg.num_workers // n_live) if n_live > 1 and cfg.num_workers else cfg.num_workers
        got = train_probes([jobs[i] for i in idx], grid=grid, norm=norm, backbone=role.net if n_live else None,
                           augment=live is not None, device=device, seed=cfg.seed, num_workers=workers,
                           residency=cfg.residency, resident_gib=cfg.resident_gib, graph=cfg.probe_graph,
                           max_together=cfg.probes_together or None, live_precision=cfg.extract_precision)
        for i, st in zip(idx, got):
            stats[i] = st
    wall = time.perf_counter() - t0
    for bar in bars:
        progress.remove_task(bar)
    out = {}
    for p, st in zip(prepared, stats):
        t1 = time.perf_counter()
        metrics, samples = evaluate_probe(p.probe, p.data_va, grid=p.val_grid, norm=norm,
                                          backbone=role.net if p.data_va.store is None else None, device=device,
                                          num_workers=cfg.num_workers, protocol=cfg.protocol,
                                          precision=cfg.extract_precision)
        out[p.task, p.name] = ({"metrics": {k: _clean(v) for k, v in metrics.items()}, "n_train": len(p.data_tr),
                                "n_val": len(p.data_va), "iters": p.spec.iters, "batch": p.spec.batch,
                                "train_loss": _clean(st["loss"]), "train_seconds": st["seconds"],
                                "train_wall_seconds_all_probes": wall, "trained_together": st.get("trained_together"),
                                "residency": st.get("residency"), "eval_seconds": time.perf_counter() - t1,
                                "train_grid": list(p.train_grid), "train_live": p.data_tr.store is None,
                                "probe": p.probe.config(), "recipe": p.spec.to_json(), "protocol": cfg.protocol}, samples)
    return out


def _base(role: _Role, task: str, name: str) -> dict:
    return {"role": role.role, "label": role.label, "model": role.name, "key": role.key, "size": role.size(),
            "dataset": name, "task": task, "protocol": role.cfg.protocol}


def _failed(base: dict, e: SndError, notes: list[str], console) -> dict:
    notes.append(f"{base['task']}/{base['dataset']} ({base['role']}): {e}")
    console.print(f"[red]failed[/] {base['role']} {base['label']} · {base['dataset']} · {base['task']}: {e}")
    return dict(base, status="failed", error=str(e))


def run(cfg: EvalConfig, tasks: list[str]) -> dict:
    """Evaluate `cfg.model` (and `cfg.baseline`) on `tasks` ("depth", "normals", "seg", "corr").

    Returns:
        {"records": [...], "trivial": [...] (one constant-predictor baseline per dense (task, dataset), see
        `snd.eval.trivial`), "notes": [...], "out": str, "tables": markdown of all tasks}.
    Raises:
        SndError when no (task, dataset) could be evaluated (the message lists what is missing).
    """
    from rich.console import Console
    from rich.table import Table

    from snd.eval.report import all_tables, console_rows, task_table

    console = Console(stderr=True)
    tasks = ["corr" if t == "correspondence" else t for t in tasks]
    out = Path(cfg.out)
    plan, notes = _plan(cfg, tasks)
    if not plan:
        raise SndError("nothing could be evaluated:\n  " + "\n  ".join(notes),
                       hint=f"put the datasets under {cfg.data_root} (see docs/datasets.md), or generate the "
                            f"procedural one: snd data synth --out {Path(cfg.data_root) / 'synth'}")
    for n in notes:
        console.print(f"[yellow]not evaluated[/] {n}")
    roles = [_Role("model", cfg.model, cfg.weights, cfg)]
    if cfg.baseline:
        roles.append(_Role("baseline", cfg.baseline, cfg.baseline_weights, cfg))
    cfg = probe_input_sized(cfg, [_patch(r) for r in roles])
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    from snd.pipeline.device import resolve_device

    device = resolve_device(cfg.device)
    from dataclasses import replace

    from snd.stages.eval_plan import resolve_eval_workers

    cfg = replace(cfg, num_workers=resolve_eval_workers(cfg.num_workers, device))
    for role in roles:
        role.cfg = cfg
    records: list[dict] = []
    tfolder = out / "results" / _trivial_folder(cfg)
    trivial: dict[tuple[str, str], dict] = {}
    for task, name in plan:
        tpath = tfolder / f"{name}_{task}.json"
        if task != "corr" and tpath.is_file():
            trivial[task, name] = json.loads(tpath.read_text())

    def keep_trivial(task: str, name: str, rec: dict | None) -> None:
        if rec is not None:
            trivial[task, name] = rec
            _write_json(tfolder / f"{name}_{task}.json", rec)

    in_use = hold_in_use(cfg.feature_cache_dir or out / "features") if cfg.feature_cache else contextlib.nullcontext()
    with in_use, _progress() as progress:  # the cache's shared lock (entered first: released on any error): gc refuses meanwhile
        for role in roles:
            folder = role.folder()
            done: dict[tuple[str, str], dict] = {}
            prepared: list[_Prepared] = []
            # 1. reuse finished records; correspondence (no training); cache rows and build every probe
            for task, name in plan:
                rpath = out / "results" / folder / f"{name}_{task}.json"
                if rpath.is_file():
                    rec = json.loads(rpath.read_text())
                    if rec.get("status") == "ok":
                        # same weights + protocol: reuse (also when the baseline equals the model)
                        rec.update(role=role.role, label=role.label, model=role.name)
                        console.print(f"[dim]done before[/] {role.role} {role.label} · {name} · {task}")
                        done[task, name] = rec
                        continue
                base = _base(role, task, name)
                t0 = time.perf_counter()
                try:
                    if task == "corr":
                        rec = dict(base, **_eval_corr(role, name, cfg, device), status="ok",
                                   seconds=time.perf_counter() - t0)
                        _write_json(rpath, rec)
                        console.print(f"[green]done[/] {role.role} {role.label} · {name} · {task} ({rec['seconds']:.0f} s)")
                        done[task, name] = rec
                    else:
                        p = _prepare_probe(role, task, name, cfg, device, out / "probes" / folder, progress,
                                           with_trivial=(task, name) not in trivial)
                        keep_trivial(task, name, p.trivial)
                        prepared.append(p)
                except SndError as e:
                    done[task, name] = _failed(base, e, notes, console)
            # 2. train this backbone's probes together, then evaluate each
            try:
                results = _train_and_evaluate(role, prepared, cfg, device, progress)
            except SndError as e:
                results = {}
                for p in prepared:
                    done[p.task, p.name] = _failed(_base(role, p.task, p.name), e, notes, console)
            for (task, name), (res, samples) in results.items():
                rpath = out / "results" / folder / f"{name}_{task}.json"
                rec = dict(_base(role, task, name), **res)
                spath = rpath.with_name(f"{name}_{task}_samples.safetensors")
                spath.parent.mkdir(parents=True, exist_ok=True)
                _save_samples(spath, samples)
                rec.update(samples=str(spath), status="ok", seconds=res["train_wall_seconds_all_probes"] + res["eval_seconds"])
                _write_json(rpath, rec)
                console.print(f"[green]done[/] {role.role} {role.label} · {name} · {task} "
                              f"(trained {res['train_seconds']:.0f} s with {res['trained_together']} probe(s) at once)")
                done[task, name] = rec
            records += [done[k] for k in plan if k in done]
        # records reused from a run made before trivial baselines existed: compute the missing ones alone
        for task, name in plan:
            if task == "corr" or (task, name) in trivial or not any(
                    r.get("status") == "ok" and (r["task"], r["dataset"]) == (task, name) for r in records):
                continue
            try:
                from snd.eval.probes import ProbeData

                train_ds, val_ds, idx_tr, idx_va = _splits(task, name, cfg, _patch(roles[0]))
                keep_trivial(task, name, _eval_trivial(task, name, ProbeData(trivial_train_set(train_ds), idx_tr, task),
                                                       ProbeData(val_ds, idx_va, task), cfg.protocol))
            except SndError as e:
                notes.append(f"{task}/{name} (trivial baseline): {e}")
    trivial_list = [trivial[k] for k in sorted(trivial)]
    ok = [r for r in records if r.get("status") == "ok"]
    tables = all_tables(records, tasks, notes=notes, trivial=trivial_list)
    (out / "results.md").write_text(tables)
    for t in tasks:
        tab = task_table(records, t, trivial=trivial_list)
        if tab:
            (out / f"results_{t}.md").write_text(tab)
    figs = _figures(records, out)
    _write_json(out / "results.json", {"protocol": cfg.protocol, "config": to_jsonable(cfg), "records": records, "trivial": trivial_list,
                                       "notes": notes, "figures": [str(f) for f in figs]})
    for t in tasks:
        head, rows = console_rows(records, t, trivial=trivial_list)
        if rows:
            preds = [f"{x['dataset']}: {x.get('predictor', '?')}" for x in trivial_list if x["task"] == t]
            caption = ("trivial = constant fit on train, scored on val (" + "; ".join(preds) + ")") if preds else None
            table = Table(title=f"{t} (protocol: {cfg.protocol})", caption=caption, show_lines=False)
            for h in head:
                table.add_column(h, justify="left" if h in ("dataset", "metric") else "right")
            for r in rows:
                table.add_row(*r)
            Console().print(table)
    if not ok:
        raise SndError("nothing could be evaluated:\n  " + "\n  ".join(notes))
    console.print(f"results ({cfg.protocol} protocol): {out / 'results.md'}")
    return {"records": records, "trivial": trivial_list, "notes": notes, "out": str(out), "tables": tables}
