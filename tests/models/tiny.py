"""A tiny MLP for fast tests: about 3 KiB of activations per sample."""

import torch
from torch import nn


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))


def make_batch(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 64)
