"""snd.cache: the versioned Zarr v3 scaffold store (schema, encoder, atomic writer, manifest, reader, stream).

Format: docs/cache-format.md. Entry points: `snd.cache.writer.SceneWriter`, `snd.cache.reader.CacheReader`,
`snd.cache.stream.ShardStream` / `make_loader` (imported lazily; this package import stays light).
"""
from snd.cache.schema import FORMAT_NAME, SCHEMA_VERSION, Encoding

__all__ = ["FORMAT_NAME", "SCHEMA_VERSION", "Encoding"]
