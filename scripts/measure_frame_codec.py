"""Size, decode cost and teacher-token effect of the frame encodings stage one can store (CPU).

Usage: python scripts/measure_frame_codec.py IMAGE... [--hw 574 868]
Each image is resized (uint8, antialiased, as stage two does) to the backbone input, then stored as
JPEG at several qualities and losslessly (snd's planar row-delta + blosc-zstd, and PNG for reference).
Token effect: a random-init ViT-S/14 (timm DINOv2 layout) on the decoded image vs the original, as the
relative L2 error of the patch tokens. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image


def timed(fn, n=20):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+")
    ap.add_argument("--hw", type=int, nargs=2, default=[574, 868])
    a = ap.parse_args()
    from snd.cache.frames import decode_frame, encode_frame, resize_uint8
    from snd.models.backbone import create_backbone

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vit = create_backbone("vit_small_patch14_dinov2", init="random", img_size=tuple(a.hw)).eval()

    def tokens(img: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vit.forward_features(img[None].float() / 255)[0]

    out = {"hw": a.hw, "images": []}
    for path in a.images:
        src = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        img = resize_uint8(src, tuple(a.hw))  # [3,H,W] uint8
        ref = tokens(img)
        row = {"image": path, "raw_kb": img.numel() / 1e3}
        for codec in ("lossless", "jpeg90", "jpeg95", "jpeg98"):
            q = int(codec[4:]) if codec.startswith("jpeg") else 0
            blob = encode_frame(img, "jpeg" if q else "lossless", quality=q or 95)
            dec = decode_frame(blob, "jpeg" if q else "lossless", tuple(a.hw))
            ms = timed(lambda: decode_frame(blob, "jpeg" if q else "lossless", tuple(a.hw)))
            err = float((tokens(dec) - ref).norm() / ref.norm()) if q else 0.0
            row[codec] = {"kb": len(blob) / 1e3, "decode_ms_1thread": ms, "max_abs_px": int((dec.int() - img.int()).abs().max()),
                          "token_rel_err": err}
        import numcodecs

        blosc = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE)
        raw = encode_frame(img, "lossless")
        comp = blosc.encode(raw)
        row["lossless"]["kb_stored_blosc_zstd1"] = len(comp) / 1e3
        row["lossless"]["decode_ms_1thread_incl_blosc"] = timed(lambda: decode_frame(
            np.frombuffer(blosc.decode(comp), np.uint8), "lossless", tuple(a.hw)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf = vit.forward_features(img[None].float() / 255)[0].float()
        row["bf16_autocast_token_rel_err"] = float((bf - ref).norm() / ref.norm())
        pngb = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(pngb, format="PNG")
        row["png"] = {"kb": len(pngb.getvalue()) / 1e3,
                      "decode_ms_1thread": timed(lambda: np.asarray(Image.open(io.BytesIO(pngb.getvalue())).convert("RGB")))}
        out["images"].append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
