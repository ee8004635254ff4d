"""tests/models/tiny.py trained with Adafactor, whose step reads values (its step count, each
parameter's RMS): a traced step answers those reads (backends/fake.py)."""

import torch
from tiny import build_model, make_batch

__all__ = ["build_model", "make_batch", "build_optimizer"]


def build_optimizer(parameters: object) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(parameters)  # type: ignore[arg-type]
