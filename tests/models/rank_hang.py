"""Rank 1 never finishes a step: the probe must stop at its --timeout, not hang."""

import os
import time

import torch


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if os.environ.get("RANK") == "1":
            time.sleep(600)
        return self.layer(inputs)


def build_model():
    return Model()


def make_batch(batch_size):
    return torch.randn(batch_size, 8)
