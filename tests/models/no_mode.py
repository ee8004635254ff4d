"""A model whose step refuses to run under a Python dispatch mode: bsplan's trial process under a
limit from outside the process must run the step as plain training does, uncounted."""

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def build_model() -> torch.nn.Module:
    return torch.nn.Linear(16, 4)


def make_batch(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 16)


def compute_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if _get_current_dispatch_mode() is not None:
        raise RuntimeError("this step ran under a dispatch mode")
    return model(batch).sum()
