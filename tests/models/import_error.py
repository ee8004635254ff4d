import torch

raise ImportError("no module named 'my_secret_package'")


def build_model():
    return torch.nn.Linear(2, 2)


def make_batch(batch_size):
    return torch.randn(batch_size, 2)
