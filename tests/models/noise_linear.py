"""Linear regression with Gaussian noise, where the gradient noise scale has a closed form.

x ~ N(0, I_d), y = w*.x + s e with e ~ N(0, 1), loss = (w.x - y)^2 / 2 averaged over the batch. At
weights w, with delta = w - w*, a sample's gradient is g = (delta.x - s e) x, so G = E[g] = delta and
E|g|^2 = (d + 2)|delta|^2 + d s^2 (the fourth moment of a Gaussian): tr(Sigma) = (d + 1)|delta|^2 +
d s^2 and B_simple = tr(Sigma) / |delta|^2. Here the model starts at w = 0 and w* has norm 1.
"""

from typing import Iterator

import torch
from torch import nn

DIM = 10
NOISE_STD = 2.0
EXACT_NOISE_SCALE = (DIM + 1) + DIM * NOISE_STD**2  # |delta|^2 = |w*|^2 = 1: 51


def _target() -> torch.Tensor:
    return torch.full((DIM,), DIM**-0.5)


def build_model() -> nn.Module:
    model = nn.Linear(DIM, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model


def make_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch_size, DIM)
    return x, x @ _target() + NOISE_STD * torch.randn(batch_size)


def train_batches(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh draws from the distribution itself: an endless dataset, so the closed form is exact."""
    for _ in range(100):
        yield make_batch(batch_size)


def compute_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).square().mean()
