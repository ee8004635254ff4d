import torch


def build_model():
    return torch.nn.Linear(2, 2)


def make_batch(batch_size):
    return [[1.0, 2.0]] * batch_size
