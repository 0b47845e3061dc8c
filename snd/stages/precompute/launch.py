"""The main (device) thread's two halves: launch a batch (predict + quantise + copy to host, no wait)
and land it (wait, numpy), so the device never idles while the host finishes the previous one."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from snd.cache.encode import encode_scaffold_device, fields_to_numpy
from snd.cache.schema import Encoding
from snd.pipeline.device import to_host_async
from snd.scaffold import ScaffoldSource
from snd.stages.precompute.frames import _Batch


@dataclass
class _InFlight:
    """A batch whose network and quantisation are queued on the device and whose fields are being copied
    into pinned host memory. The main thread launches the next batch before it lands this one, so the
    device never idles while the host turns fields into numpy, builds operators or queues writes."""

    batch: _Batch
    host: dict[str, torch.Tensor]  # stored fields on the host (pinned on CUDA; filled when `events[2]` fires)
    events: list | None  # CUDA events: queued, predicted, copied (None on CPU, where everything is done)
    # the same fields where the quantiser left them: the operator stage decodes these, so the scaffold does not
    # go back to the device from pageable numpy (~80 MB per batch at 576x880; that thread's decode phase took 7.5 ms
    # per pair with the copy, 4.5 without, H100)
    device_fields: dict[str, torch.Tensor] | None = None


def _launch(source: ScaffoldSource, b: _Batch, enc: Encoding, phases: dict[str, float]) -> _InFlight:
    """Queue predict + quantise + device-to-host copy of one batch; returns without waiting for the device
    (nothing on this path reads a device value back: non-blocking copies, `inv_ex`, host-checked near/far)."""
    t0 = time.perf_counter()
    dev = torch.device(source.device)
    cuda = dev.type == "cuda"
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else None
    if ev:
        ev[0].record()
    images = b.images.to(dev, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)  # [B,2,3,H,W]

    def to_device(a: np.ndarray) -> torch.Tensor:  # through pinned memory: a truly asynchronous copy
        t = torch.from_numpy(a)
        return t.pin_memory().to(dev, non_blocking=True) if cuda else t

    K, c2w = to_device(b.ctx_K), to_device(b.ctx_c2w)  # float64
    depth = b.depth.to(dev, non_blocking=True) if b.depth is not None else None
    gs = source.predict(images, K.float(), c2w.float(), depth=depth)
    if ev:
        ev[1].record()
    stack = [torch.stack([getattr(g, k) for g in gs]) for k in ("means", "quats", "scales", "opacities")]
    fields = encode_scaffold_device(*stack, K, c2w, enc=enc)
    host = {k: to_host_async(v) for k, v in fields.items()}
    if ev:
        ev[2].record()
    phases["launch"] = phases.get("launch", 0.0) + time.perf_counter() - t0
    return _InFlight(b, host, ev, fields)


def _land(f: _InFlight, enc: Encoding, phases: dict[str, float]) -> dict[str, np.ndarray]:
    """Wait for a launched batch's fields and add the loader's arrays: the operator stage's input
    (`snd.stages.precompute.operators.OperatorStage`, which adds the operators and hands the batch on)."""
    t0 = time.perf_counter()
    if f.events is not None:
        ev = f.events
        ev[2].synchronize()
        # device time of each part, from the events (exact even though the host did not wait for them)
        phases["device_predict"] = phases.get("device_predict", 0.0) + ev[0].elapsed_time(ev[1]) / 1e3
        phases["device_encode"] = phases.get("device_encode", 0.0) + ev[1].elapsed_time(ev[2]) / 1e3
    phases["wait_device"] = phases.get("wait_device", 0.0) + time.perf_counter() - t0
    fields = fields_to_numpy(f.host, enc)
    fields.update(f.batch.extra)
    return fields
