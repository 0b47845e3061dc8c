"""In-memory stand-ins for the eval caches, for tests that feed probes hand-made tokens."""
from __future__ import annotations


class MemoryStore:
    """A FeatureStore stand-in: token rows kept in memory (`.t`)."""

    def __init__(self, tokens):
        self.t = tokens

    def __len__(self):
        return len(self.t)

    def tokens(self, i):
        return self.t[i]
