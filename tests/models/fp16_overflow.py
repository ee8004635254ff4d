"""Gradients in the hundreds: fine in fp16, but scaled by GradScaler's default 65536 they overflow
and the scaler skips the optimizer step (and with it the optimizer state)."""

import torch


def build_model():
    return torch.nn.Linear(64, 64)


def make_batch(batch_size):
    return torch.randn(batch_size, 64) * 10


def compute_loss(model, batch):
    return model(batch).float().pow(2).mean() * 10
