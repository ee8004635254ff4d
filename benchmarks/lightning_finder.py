"""Lightning's BatchSizeFinder (binsearch, its defaults) on a bsplan model file, under the same
memory cap as `bsplan probe --memory-limit`: bsplan's counting limit on the CPU (the same
DefaultCPUAllocator out-of-memory Lightning recognises), the allocator fraction on CUDA, or (--outside-limit) an OS limit that
the caller set on this process.
Prints one JSON line: {"max_batch", "trials", "error"}. Run by benchmarks/vs_lightning.py.

    python benchmarks/lightning_finder.py examples/cnn.py 300MiB [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader, IterableDataset

from bsplan.backends.cpu import TensorBytesLimit
from bsplan.measure.workload import Workload, load_workload
from bsplan.planning.units import parse_size


class Batches(IterableDataset):
    """make_batch(batch_size) over and over: the finder sets the size, the file makes the batch."""

    def __init__(self, workload: Workload, batch_size: int) -> None:
        self.workload, self.batch_size = workload, batch_size

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.workload.make_batch(self.batch_size, torch.device("cpu"))


class FileModule(pl.LightningModule):
    def __init__(self, workload: Workload) -> None:
        super().__init__()
        self.workload = workload
        self.model = workload.build_model()
        self.batch_size = 2  # BatchSizeFinder's init_val
        self.tried: list[int] = []

    def train_dataloader(self) -> DataLoader:
        self.tried.append(self.batch_size)
        return DataLoader(Batches(self.workload, self.batch_size), batch_size=None)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        return self.workload.loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.workload.optimizer(self.model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("limit")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--outside-limit", action="store_true", help="the cap is an OS limit on this process: count nothing")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    limit = parse_size(args.limit)
    cap: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if args.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    elif not args.outside_limit:
        cap = TensorBytesLimit(limit)
    found, error = None, None
    with cap:
        module = FileModule(load_workload(args.model))
        trainer = pl.Trainer(
            accelerator=args.device, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        try:
            found = Tuner(trainer).scale_batch_size(module, mode="binsearch")
        except Exception as failure:  # noqa: BLE001 - the benchmark reports Lightning's crash
            error = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
    # The first dataloader is built at the initial size before the search starts.
    print(json.dumps({"max_batch": found, "trials": len(module.tried) - 1, "tried": module.tried, "error": error}))


if __name__ == "__main__":
    main()
