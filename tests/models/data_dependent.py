"""A model whose step reads a tensor's value (a Python float from the batch), which a traced step's
fake tensors do not have: estimate and the probe's aim fall back to real steps, saying why."""

import torch


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))


def make_batch(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 64)


def compute_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    scale = float(batch.abs().max())  # a value: data-dependent
    return model(batch / scale).float().pow(2).mean()
