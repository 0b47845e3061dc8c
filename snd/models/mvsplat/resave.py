"""`python -m snd.models.mvsplat.resave SRC.ckpt DST.safetensors`: keep only an MVSplat checkpoint's
encoder weights (`--random CONFIG DST.safetensors`: random weights, for benchmarks of the whole
`snd precompute` command where no real checkpoint can be had).

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


def save_random_weights(config: str, dst: "str | Path", seed: int = 0) -> int:
    """Write a random-init encoder of `config` ('scannetpp' / 're10k') to `dst`: the same weights as
    `--source mvsplat` with random init (seed 0), loadable by `--mvsplat-ckpt`. Speed does not depend on
    the weights; the scaffolds are meaningless."""
    from safetensors.torch import save_file

    from .source import MVSplatSource

    enc = MVSplatSource(None, config, "cpu", "fp32", seed=seed).encoder
    sd = {k: v.contiguous() for k, v in enc.state_dict().items()}
    save_file(sd, str(dst))
    return len(sd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = __doc__.split("\n\n")[0].strip()  # both forms, whole sentences
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(args) == 3 and args[0] == "--random":
        n = save_random_weights(args[1], args[2])
        print(f"wrote {n} random encoder tensors ({args[1]}) to {args[2]}")
        return 0
    if len(args) != 2 or args[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    n = resave_encoder_weights(args[0], args[1])
    print(f"wrote {n} encoder tensors to {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
