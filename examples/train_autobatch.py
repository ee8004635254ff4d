"""A plain PyTorch training loop with bsplan's AutoBatch: every optimizer step trains on the same
batch of 2048 samples, and when memory runs out the step is re-run in smaller micro-batches.

The memory here is the CPU's under bsplan's exact tensor-byte limit (bsplan.backends.cpu), a stand-in
for a GPU of that size, so the shrink shows on any machine. On a GPU, pass --device cuda: the
limit then counts nothing and the GPU's own memory decides.

    python examples/train_autobatch.py [--batch 2048] [--memory-limit 24MiB] [--micro-batch N]
"""

from __future__ import annotations

import argparse

import torch
from mlp import build_model, compute_loss, make_batch  # examples/mlp.py, a model file for `bsplan probe`

from bsplan.backends.cpu import TensorBytesLimit
from bsplan.planning.units import parse_size
from bsplan.runtime.autobatch import AutoBatch, MicroBatchChange


def report(change: MicroBatchChange) -> None:
    print(f"  AutoBatch: step {change.step}: micro-batch {change.old} -> {change.new} ({change.reason})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048, help="samples per optimizer step (kept fixed)")
    parser.add_argument("--micro-batch", type=int, default=None, help="where to start (a probe's recommended_batch); default: the whole batch")
    parser.add_argument("--memory-limit", default="24MiB", help="CPU tensor bytes allowed")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    # compute_loss returns the mean over its micro-batch: reduction="mean" weighs each by its share.
    auto = AutoBatch(args.micro_batch, reduction="mean", on_change=report)
    with TensorBytesLimit(parse_size(args.memory_limit)):  # the model's weights count, as on a GPU
        model = build_model().to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(args.steps):
            batch = tuple(tensor.to(args.device) for tensor in make_batch(args.batch))
            loss = auto.step(model, batch, compute_loss)  # forward and backward of every micro-batch
            optimizer.step()  # once per step, outside what AutoBatch retries
            print(f"step {step}: loss {loss.item():.4f} over {args.batch} samples, micro-batch {auto.micro_batch}")
    print(f"{len(auto.changes)} change(s); every step trained on {args.batch} samples")


if __name__ == "__main__":
    main()
