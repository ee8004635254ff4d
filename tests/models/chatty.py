"""Prints while it builds and trains: none of it may reach the JSON on stdout. Its atexit handler
must still run after bsplan's fast exit."""

import atexit
import sys

import torch

print("building a model, hello from the model file")
atexit.register(lambda: print("the model file's atexit handler ran", file=sys.stderr))


def build_model():
    print("build_model says hi")
    return torch.nn.Linear(16, 4)


def make_batch(batch_size):
    print(f"make_batch({batch_size})")
    return torch.randn(batch_size, 16)
