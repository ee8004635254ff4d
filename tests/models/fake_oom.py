"""Raises the messages a real GPU gives when memory runs out, from FAKE_OOM_BATCH samples up."""

import os

import torch

LIMIT = int(os.environ.get("FAKE_OOM_BATCH", "20"))
MESSAGE = os.environ.get("FAKE_OOM_MESSAGE", "CUDA out of memory. Tried to allocate 2.00 GiB")


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[0] >= LIMIT:
            raise RuntimeError(MESSAGE)
        return self.layer(inputs)


def build_model():
    return Model()


def make_batch(batch_size):
    return torch.randn(batch_size, 4)
