"""A model whose peak is set by a gradient: the first layer's 51 MB weight gradient is allocated in
backward while little else is live (plain SGD keeps no state)."""

import torch


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 200_000), torch.nn.Linear(200_000, 1))


def make_batch(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 64)


def compute_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def build_optimizer(parameters):  # type: ignore[no-untyped-def]
    return torch.optim.SGD(parameters, lr=0.1)
