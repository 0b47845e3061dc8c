"""Probe checkpoints: one safetensors file (tensors `probe.*`, `optim.<i>.*`; metadata: step, task, probe
config, recipe) replaced atomically, plus a human-readable `state.json` beside it.

Optimizer moments and step counts are saved whatever device or flavour (fused, capturable) produced them
and are moved back by `Optimizer.load_state_dict`, so a probe resumes exactly where it stopped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from snd.data.formats import write_json
from snd.eval.probes.base import Probe, ProbeSpec

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: Path, probe: Probe, optimizer: torch.optim.Optimizer, step: int, spec: ProbeSpec,
                    extra: dict | None = None) -> None:
    """Atomically write probe + AdamW state + step to `path` (safetensors) and `state.json` beside it."""
    from safetensors.torch import save_file

    tensors = {f"probe.{k}": v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous().reshape(-1) if k == "step" \
                else v.detach().cpu().contiguous()
    meta = {"step": str(step), "task": probe.task, "config": json.dumps(probe.config()),
            "spec": json.dumps(spec.to_json()), "extra": json.dumps(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    write_json(path.with_name("state.json"), {"step": step, "iters": spec.iters, "task": probe.task,
                                              "config": probe.config(), "spec": spec.to_json(), **(extra or {})})


def load_checkpoint(path: Path, probe: Probe, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a `save_checkpoint` file into `probe` (+ `optimizer`); returns the metadata (step as int)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("task") != probe.task:
        raise ValueError(f"checkpoint {path} is a {meta.get('task')!r} probe, not {probe.task!r}")
    if json.loads(meta["config"]) != probe.config():
        raise ValueError(f"checkpoint {path} was made for probe config {meta['config']}, not {probe.config()}")
    probe.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("probe.")}, strict=True)
    if optimizer is not None:
        sd = optimizer.state_dict()
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
        sd["state"] = state
        optimizer.load_state_dict(sd)
    meta["step"] = int(meta["step"])
    return meta
