"""A small MLP on scikit-learn's digits (1,797 images of 8x8 pixels that ship inside scikit-learn: no
download): a model file with real data for `bsplan noise`, the exact noise scale to check it
against, and a training loop that follows the noise scale with bsplan's runtime NoiseScale.

    bsplan noise examples/noise_digits.py --json              # B_simple at the initial weights
    python examples/noise_digits.py exact                     # the exact value there (per-sample gradients)
    python examples/noise_digits.py train --save digits.pt    # train, printing NoiseScale; save the weights
    bsplan noise examples/noise_digits.py --checkpoint digits.pt
    python examples/noise_digits.py exact --checkpoint digits.pt

Needs scikit-learn (pip install scikit-learn; the test extra installs it). docs/noise.md.
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@lru_cache(maxsize=1)
def dataset() -> Batch:
    """Every sample: pixels scaled to [0, 1] and the digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target, dtype=torch.long)


def build_model() -> nn.Module:
    # Seeded on its own, so `bsplan noise` and `exact` measure the very same weights in any process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def make_batch(batch_size: int) -> Batch:
    """Real samples too (the first batch_size, repeated if need be): what `bsplan probe` runs."""
    inputs, labels = dataset()
    index = torch.arange(batch_size) % len(labels)
    return inputs[index], labels[index]


def train_batches(batch_size: int) -> Iterator[Batch]:
    """Batches drawn at random with replacement from torch's global generator (bsplan noise --seed
    seeds it): the independent draws the noise scale's estimator assumes. One epoch's worth."""
    inputs, labels = dataset()
    for _ in range(max(1, len(labels) // batch_size)):
        index = torch.randint(len(labels), (batch_size,))
        yield inputs[index], labels[index]


def compute_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)  # the mean over the batch's samples


def _model(checkpoint: str | None) -> nn.Module:
    model = build_model()
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model


def exact(checkpoint: str | None) -> None:
    """The exact noise scale over all 1,797 samples at these weights (bsplan.measure.noise.exact_noise)."""
    from bsplan.measure.noise import exact_noise
    from bsplan.measure.workload import load_workload

    result = exact_noise(load_workload(__file__), _model(checkpoint), dataset())
    print(f"exact over {result.samples} samples: noise_scale {result.noise_scale:.4g}, "
          f"|G|^2 {result.gradient_norm_squared:.4g}, tr(Sigma) {result.trace_sigma:.4g}")


def train(steps: int, micro_batch: int, accumulation: int, lr: float, save: str | None) -> None:
    """SGD with gradient accumulation; NoiseScale reads the micro-batches' gradients as the small
    batch and their sum as the big one, at the cost of one extra norm per micro-batch."""
    from bsplan.runtime.noise import NoiseScale

    torch.manual_seed(0)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    noise = NoiseScale(model, micro_batch, accumulation, beta=0.95)
    batches = _endless(micro_batch)
    for step in range(1, steps + 1):
        for _ in range(accumulation):
            (compute_loss(model, next(batches)) / accumulation).backward()  # each micro-batch weighs 1/accumulation
        noise.step()  # after the last backward, before zero_grad
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, steps // 10) == 0:
            value = "-" if noise.value is None else f"{noise.value:.4g}"
            loss = compute_loss(model, dataset()).item()
            print(f"step {step:5}: loss {loss:.4f}, noise scale {value} (global batch {micro_batch * accumulation})")
    noise.close()
    if save:
        torch.save(model.state_dict(), save)
        print(f"saved the weights to {save}")


def _endless(batch_size: int) -> Iterator[Batch]:
    while True:
        yield from train_batches(batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    exact_parser = commands.add_parser("exact", help="print the exact noise scale at the weights")
    exact_parser.add_argument("--checkpoint", help="a state dict saved by `train --save`")
    train_parser = commands.add_parser("train", help="train with the runtime NoiseScale")
    train_parser.add_argument("--steps", type=int, default=500)
    train_parser.add_argument("--micro-batch", type=int, default=16)
    train_parser.add_argument("--accumulation", type=int, default=8)
    train_parser.add_argument("--lr", type=float, default=0.5)
    train_parser.add_argument("--save", help="write the trained state dict here")
    args = parser.parse_args()
    if args.command == "exact":
        exact(args.checkpoint)
    else:
        train(args.steps, args.micro_batch, args.accumulation, args.lr, args.save)


if __name__ == "__main__":
    main()
