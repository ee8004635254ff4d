"""A probe's device: the few things a trial needs of any device, and `--device` to a backend.

A probe needs its name and memory, the peak of allocated bytes since a reset, the bytes allocated
now, a way to release what a failed trial left, and a synchronisation point for timing. The CUDA
backend is backends/cuda.py, the CPU's is backends/cpu.py.
"""

from __future__ import annotations

import contextlib
import re
from typing import Protocol

import torch

from bsplan.backends import cuda
from bsplan.backends.cpu import CpuDevice
from bsplan.backends.cuda import CudaDevice
from bsplan.planning.errors import BadInput
from bsplan.planning.results import DeviceInfo


class Device(Protocol):
    info: DeviceInfo
    torch_device: torch.device
    notes: list[str]
    outside_limit: str | None  # the limit from outside the process that sets the edge (RLIMIT_DATA, ...), if one does
    # current_bytes() is tensor bytes; False: what a limit from outside the process counts (the
    # process's heap and more), which no garbage collection squares with the tensors
    counts_tensors: bool

    def tracking(self) -> contextlib.AbstractContextManager[None]: ...
    def place(self, model: torch.nn.Module) -> torch.nn.Module: ...  # the model built under tracking(), on this device
    def reset_peak(self) -> None: ...
    def peak_bytes(self) -> int: ...
    def limit_peak_bytes(self) -> int: ...  # the peak in what the limit counts: peak_bytes, or an outside limit's usage
    def current_bytes(self) -> int: ...
    def release(self) -> None: ...  # return freed memory to the device (CUDA's cache, the C heap)
    def synchronize(self) -> None: ...
    # around the optimizer's step: a traced device answers the scalars it reads (backends/fake.py)
    def stepping(self) -> contextlib.AbstractContextManager[None]: ...


def open_device(spec: str | None, memory_limit: int | None, count_tensors: bool = True) -> Device:
    """`--device` to a backend: cuda[:N] or cpu; None picks cuda:0 when CUDA is available.
    `count_tensors=False`: a CPU under a limit from outside the process runs uncounted (CpuDevice)."""
    if spec is None:
        spec = "cuda:0" if cuda.available() else "cpu"
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", spec.strip().lower())
    if match is None:
        raise BadInput(f"unknown device {spec!r}: use cpu, cuda or cuda:N")
    if match.group(1) == "cpu":
        return CpuDevice(memory_limit, count_tensors)
    index = int(match.group(2) or 0)
    if not cuda.available():
        raise BadInput(f"{spec} was asked for but CUDA is not available here: use --device cpu")
    if index >= cuda.device_count():
        raise BadInput(f"{spec} does not exist: this machine has {cuda.device_count()} CUDA device(s)")
    return CudaDevice(index, memory_limit)
