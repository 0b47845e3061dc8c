"""snd.scaffold: stage-one scaffold sources behind one interface (`ScaffoldSource`).

`create_source("depth" | "mvsplat", **options)`, `list_sources()`, `register_source(name)`.
"""
from snd.scaffold.base import ScaffoldSource, create_source, list_sources, register_source, resolve_device

__all__ = ["ScaffoldSource", "create_source", "list_sources", "register_source", "resolve_device"]
