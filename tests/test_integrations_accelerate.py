"""find_executable_batch_size keeping the global batch: after each out-of-memory the micro-batch
shrinks to the next divisor and the accumulation grows, so every step sees the same samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bsplan.backends.cpu import TensorBytesLimit
from bsplan.integrations.accelerate import find_executable_batch_size
from bsplan.planning.errors import BadInput


def test_out_of_memory_shrinks_the_micro_batch_and_keeps_the_global_batch() -> None:
    tried: list[tuple[int, int]] = []

    @find_executable_batch_size(global_batch=4096)
    def train(batch_size: int, accumulation_steps: int) -> int:
        tried.append((batch_size, accumulation_steps))
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
        seen = 0
        for _ in range(accumulation_steps):
            inputs = torch.randn(batch_size, 784)
            model(inputs).square().mean().backward()
            seen += batch_size
        return seen

    with TensorBytesLimit(16 * 2**20):
        assert train() == 4096
    assert len(tried) > 1 and all(size * steps == 4096 for size, steps in tried)
    assert [size for size, _ in tried] == sorted((size for size, _ in tried), reverse=True)


def test_an_error_that_is_not_out_of_memory_is_raised_at_once() -> None:
    calls = []

    def train(batch_size: int, accumulation_steps: int) -> None:
        calls.append(batch_size)
        raise ValueError("the user's own bug")

    with pytest.raises(ValueError, match="own bug"):
        find_executable_batch_size(train, global_batch=64)()
    assert calls == [64]
    with pytest.raises(BadInput):
        find_executable_batch_size(train, global_batch=0)
