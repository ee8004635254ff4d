"""Runs out of memory on rank 1 only, from RANK_OOM_BATCH samples up: in the forward, or in the
backward (before its gradients are ready, so rank 0 waits in DDP's all-reduce for them)."""

import os

import torch

LIMIT = int(os.environ.get("RANK_OOM_BATCH", "10"))
WHERE = os.environ.get("RANK_OOM_WHERE", "forward")


def _out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (forced on rank 1)")


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise _out_of_memory()


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        failing = os.environ.get("RANK") == "1" and inputs.shape[0] >= LIMIT
        if failing and WHERE == "forward":
            raise _out_of_memory()
        outputs = self.layer(inputs)
        return FailInBackward.apply(outputs) if failing else outputs


def build_model():
    return Model()


def make_batch(batch_size):
    return torch.randn(batch_size, 8)
