"""Shared fixtures: small procedural datasets generated once per test session.

Why session scope: generating scenes (ray casting) is the slowest fixture; every module reads the
same few scenes, and tests must never write into them (copy first if a test corrupts files).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two procedural scenes of 16 frames at 112x168 in the raw ScanNet++ v2 layout (read-only!)."""
    from snd.data.synth import generate_dataset
    from snd.pipeline.config import SynthConfig

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(SynthConfig(out=root, scenes=2, frames=16, height=112, width=168, objects=5, seed=0))
    return root


@pytest.fixture
def one_thread():
    """Tiny probes run many small ops: one torch thread avoids OpenMP spin contention on a busy 2-core
    machine (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
