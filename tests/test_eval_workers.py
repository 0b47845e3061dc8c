"""`snd eval --num-workers`: "auto" from the CPU count and the device (the paper protocol's live training items are
augmented by the DataLoader workers), integers as given, anything else a clear error."""
import pytest
import torch

from snd.errors import SndError
from snd.stages.eval_plan import AUTO_EVAL_WORKERS_CAP, resolve_eval_workers

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_takes_the_cores_less_two_on_cuda_capped():
    assert resolve_eval_workers("auto", CUDA, cpus=16) == 14
    assert resolve_eval_workers("auto", CUDA, cpus=2) == 1  # never 0 on CUDA: the main thread would augment
    assert resolve_eval_workers("auto", CUDA, cpus=128) == AUTO_EVAL_WORKERS_CAP == 32


def test_auto_leaves_a_cpu_device_its_cores():
    assert resolve_eval_workers("auto", CPU, cpus=2) == 1
    assert resolve_eval_workers("auto", CPU, cpus=64) == 2
    assert resolve_eval_workers("auto", CPU, cpus=1) == 0


def test_integers_pass_through_and_bad_values_are_named():
    assert resolve_eval_workers(0, CUDA) == 0 and resolve_eval_workers("7", CPU) == 7
    with pytest.raises(SndError, match="'many'"):
        resolve_eval_workers("many", CPU)
    with pytest.raises(SndError, match=">= 0"):
        resolve_eval_workers("-1", CPU)
