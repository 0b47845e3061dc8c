"""Interpreter workarounds (`snd.pipeline.compat`)."""
from __future__ import annotations

import ast
import threading

import pytest

from snd.pipeline.compat import AST_LOCK, needs_ast_lock, serialize_ast_parse


def test_ast_parse_is_serialized_for_stage_ones_threads():
    """After `serialize_ast_parse`, `ast.parse` and `ast.literal_eval` (numpy's .npy header parser) wait for
    `AST_LOCK`: a thread parsing while another holds it blocks until it is released, then parses correctly."""
    if not needs_ast_lock():
        assert serialize_ast_parse() is False
        pytest.skip("this interpreter keeps no shared AST recursion counter")
    assert serialize_ast_parse() and serialize_ast_parse()  # idempotent: wrapped once
    assert getattr(ast.parse, "_snd_serialized", False) and not getattr(ast.parse.__wrapped__, "_snd_serialized", False)
    got, done = [], threading.Event()

    def parse() -> None:
        got.append(ast.literal_eval("{'descr': '<f4', 'shape': (2, 3)}"))
        done.set()

    with AST_LOCK:
        t = threading.Thread(target=parse)
        t.start()
        assert not done.wait(0.3)  # blocked behind the lock
    t.join(10)
    assert done.is_set() and got == [{"descr": "<f4", "shape": (2, 3)}]


def test_stage_one_serializes_ast_parse(synth_root, tmp_path):
    """`snd precompute` (its `run`) installs the lock before its loader threads start."""
    if not needs_ast_lock():
        pytest.skip("this interpreter keeps no shared AST recursion counter")
    from snd.pipeline.config import PrecomputeConfig
    from snd.stages.precompute import run

    ast.parse = getattr(ast.parse, "__wrapped__", ast.parse)  # as a fresh process has it
    run(PrecomputeConfig(data=synth_root, out=tmp_path / "c", height=56, width=84, pairs_per_scene=1, targets_per_pair=1,
                         batch_pairs=1, device="cpu", source="depth", operator=False, images="off", scenes=1), progress=False)
    assert getattr(ast.parse, "_snd_serialized", False)
