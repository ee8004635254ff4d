"""A model file whose make_batch takes the sequence length (docs/model-file.md): bsplan probe
--seq-len L calls make_batch(batch_size, L)."""

import torch
from factories import TinyLM


def build_model() -> torch.nn.Module:
    return TinyLM()


def make_batch(batch_size: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch_size, seq_len))
