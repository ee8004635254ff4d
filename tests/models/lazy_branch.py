"""A branch only batches above 16 take (as an expert no small batch is routed to): its optimizer
state is made in a later trial than the first, and a trial may run out of memory halfway through
making it."""

import torch


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = torch.nn.Linear(8, 8)
        self.large = torch.nn.Linear(1000, 1000, bias=False)  # 4 MB: Adam's state for it is 8 MB

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        loss = self.small(inputs).sum()
        if inputs.shape[0] > 16:
            loss = loss + self.large(torch.ones(1, 1000)).sum()
        return loss


def build_model():
    return Model()


def make_batch(batch_size):
    return torch.randn(batch_size, 8)


def compute_loss(model, batch):
    return model(batch)


def build_optimizer(parameters):
    return torch.optim.Adam(parameters)
