"""Raises oneDNN's ambiguous 'could not create a primitive' from BATCH_LIMIT on (or always, at 0)."""

import os

import torch

BATCH_LIMIT = int(os.environ.get("AMBIGUOUS_LIMIT", "8"))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[0] > BATCH_LIMIT:
            raise RuntimeError("could not create a primitive")
        return self.layer(inputs)


def build_model():
    return Model()


def make_batch(batch_size):
    return torch.randn(batch_size, 4)
