"""snd: Splat and Distill (ICLR 2026) as a package.

Data flows one way: data -> precompute (Gaussian scaffolds into Zarr shards) -> distill (LoRA student,
EMA teacher, splatted targets) -> checkpoint -> eval / export. See docs/architecture.md.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
