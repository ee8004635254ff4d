"""Holds 4 MiB of touched memory per sample in its forward, at once: past a cgroup's limit the
kernel kills it quickly instead of reclaiming page after page while activations grow."""

import torch


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        held = torch.ones(inputs.shape[0], 2**20)  # 4 MiB a sample, every page written
        return self.layer(inputs) + held.sum() * 0


def build_model():
    return Model()


def make_batch(batch_size):
    return torch.randn(batch_size, 8)
