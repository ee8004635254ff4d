"""Factories for `bsplan probe MODULE:CALLABLE` tests: plain callables that return an nn.Module, with
no make_batch of their own (the command line describes the input)."""

import torch
from torch import nn


def classifier() -> nn.Module:
    """A float input of 1x16x16 to 10 classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


class TinyLM(nn.Module):
    """Token ids to next-token logits through a list of repeated blocks (what checkpointing wraps)."""

    def __init__(self, vocab: int = 256, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                                    for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden)


def not_a_model() -> int:
    return 3
