"""In-memory stand-ins for the eval caches, for tests that feed probes hand-made tokens."""
from __future__ import annotations

import torch


class MemoryStore:
    """A FeatureStore stand-in: token rows kept in memory (`.t`)."""

    def __init__(self, tokens):
        self.t = tokens

    def __len__(self):
        return len(self.t)

    def tokens(self, i):
        return self.t[i]


def identity_norm(c: int) -> dict:
    """Final LayerNorm params that leave normalised tokens as they are (weight 1, bias 0), as probes take them."""
    return {"weight": torch.ones(c), "bias": torch.zeros(c), "eps": torch.tensor([1e-6], dtype=torch.float64)}
