"""`python -m snd.models.mvsplat.resave SRC.ckpt DST.safetensors`: keep only an MVSplat checkpoint's
encoder weights.

Why: upstream Lightning checkpoints may pickle Python objects (hyper-parameters, scheduler state) that
`torch.load(weights_only=True)` refuses. This one-off tool unpickles SRC *fully* (it can run code from
the file: use it only on checkpoints you trust), then writes the encoder tensors as safetensors, which
snd loads safely from then on.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def resave_encoder_weights(src: "str | Path", dst: "str | Path") -> int:
    """Unsafe-load `src` (trusted files only), write its encoder state dict to `dst`; returns tensor count."""
    from safetensors.torch import save_file

    from .load import convert_mvsplat_state_dict

    obj = torch.load(str(src), map_location="cpu", weights_only=False)  # explicit, user-requested
    sd = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    enc = convert_mvsplat_state_dict(sd)
    save_file({k: v.contiguous() for k, v in enc.items()}, str(dst))
    return len(enc)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    n = resave_encoder_weights(args[0], args[1])
    print(f"wrote {n} encoder tensors to {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
