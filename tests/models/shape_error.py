import torch


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(16, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(inputs)  # inputs have 17 features: an ordinary user error


def build_model():
    return Model()


def make_batch(batch_size):
    return torch.randn(batch_size, 17)
