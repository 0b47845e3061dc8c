"""snd: Splat and Distill (ICLR 2026) as a package.

Data flows one way: data -> precompute (Gaussian scaffolds into Zarr shards) -> distill (LoRA student,
EMA teacher, splatted targets) -> checkpoint -> eval / export. See docs/architecture.md.

    import snd
    model = snd.load_backbone("runs/snd")              # run, export folder, weights file, or name + weights
    cls, patches = snd.extract_features(model, images)  # PIL / numpy / tensors
"""
__version__ = "0.1.0"

__all__ = ["__version__", "extract_features", "load_backbone"]


def __getattr__(name: str):
    # lazy: `import snd` stays light (no torch/timm import until the API is used)
    if name in ("load_backbone", "extract_features"):
        from snd import api

        return getattr(api, name)
    raise AttributeError(f"module 'snd' has no attribute {name!r}")
