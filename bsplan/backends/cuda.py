"""The one module that calls torch.cuda: a CUDA GPU as a probe's device, and the few CUDA calls the
rest of bsplan needs (is there a GPU, how many, pick one, empty the cache). Tests drive CudaDevice
with a fake `torch.cuda` module; everything else asks the functions here.

A ROCm build of torch (torch.version.hip set) drives AMD GPUs through the same torch.cuda API (HIP
stands in for CUDA, RCCL for NCCL), so `--device cuda` means an AMD GPU there and only the device's
description says which.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from bsplan.planning.results import DeviceInfo


def rocm_version() -> str | None:
    """HIP's version where torch is a ROCm build, else None."""
    return getattr(torch.version, "hip", None)


def available() -> bool:
    return torch.cuda.is_available()


def device_count() -> int:
    return torch.cuda.device_count()


def set_device(index: int) -> None:
    """Make `index` this process's current CUDA device (a rank's own GPU)."""
    torch.cuda.set_device(index)


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def empty_cache() -> None:
    """Give the caching allocator's free blocks back to the driver, where CUDA has been started."""
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class CudaDevice:
    """A CUDA GPU, measured by the caching allocator's counters (allocated bytes, as the ZeRO and
    PyTorch docs count them; the CUDA context sits outside them)."""

    def __init__(self, index: int, memory_limit: int | None, cuda: Any = torch.cuda) -> None:
        self.cuda = cuda
        self.index = index
        self.torch_device = torch.device("cuda", index)
        self.notes: list[str] = []
        self.outside_limit = None
        self.counts_tensors = True
        properties = cuda.get_device_properties(index)
        total = int(properties.total_memory)
        source = "device"
        if memory_limit is not None and memory_limit < total:
            # The allocator refuses to grow past this fraction with a real torch.OutOfMemoryError.
            cuda.set_per_process_memory_fraction(memory_limit / total, index)
            total, source = memory_limit, "--memory-limit"
        rocm = f", ROCm {hip}" if (hip := rocm_version()) else ""
        self.info = DeviceInfo(f"cuda:{index} ({properties.name}{rocm})", "cuda", total, source, exact=True)

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        yield

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.torch_device)

    def reset_peak(self) -> None:
        self.cuda.reset_peak_memory_stats(self.index)

    def peak_bytes(self) -> int:
        return int(self.cuda.max_memory_allocated(self.index))

    def limit_peak_bytes(self) -> int:
        return self.peak_bytes()

    def current_bytes(self) -> int:
        return int(self.cuda.memory_allocated(self.index))

    def release(self) -> None:
        self.cuda.synchronize(self.index)
        self.cuda.empty_cache()

    def synchronize(self) -> None:
        self.cuda.synchronize(self.index)

    def stepping(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
