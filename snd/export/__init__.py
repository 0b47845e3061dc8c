"""snd.export: hand a trained backbone over — timm/HF hub layout, the official release layout, a model card."""
from snd.export.hub import export_run

__all__ = ["export_run"]
