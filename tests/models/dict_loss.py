"""A model that takes a dict batch and returns an object with `.loss`, as Hugging Face models do."""

from types import SimpleNamespace

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        logits = self.head(self.embed(input_ids).mean(dim=1))
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def build_model() -> nn.Module:
    return Classifier()


def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (batch_size, 16)), "labels": torch.randint(0, 5, (batch_size,))}
