"""Device backends: the one place that touches torch.cuda, and the CPU under a memory limit.

A probe needs the same few things of any device: its name and memory, the peak of allocated
bytes since a reset, the bytes allocated now, a way to release what a failed trial left, and a
synchronisation point for timing. Tests drive CudaDevice with a fake `torch.cuda` module.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Protocol

import torch

from bsplan.cpumem import TensorBytesLimit, host_limits, trim_heap
from bsplan.errors import BadInput
from bsplan.result import DeviceInfo
from bsplan.units import format_bytes


class Device(Protocol):
    info: DeviceInfo
    torch_device: torch.device
    notes: list[str]
    outside_limit: str | None  # the limit from outside the process that sets the edge (RLIMIT_DATA, ...), if one does

    def tracking(self) -> contextlib.AbstractContextManager[None]: ...
    def reset_peak(self) -> None: ...
    def peak_bytes(self) -> int: ...
    def current_bytes(self) -> int: ...
    def release(self) -> None: ...  # return freed memory to the device (CUDA's cache, the C heap)
    def synchronize(self) -> None: ...


class CudaDevice:
    """A CUDA GPU, measured by the caching allocator's counters (allocated bytes, as the ZeRO and
    PyTorch docs count them; the CUDA context sits outside them)."""

    def __init__(self, index: int, memory_limit: int | None, cuda: Any = torch.cuda) -> None:
        self.cuda = cuda
        self.index = index
        self.torch_device = torch.device("cuda", index)
        self.notes: list[str] = []
        self.outside_limit = None
        properties = cuda.get_device_properties(index)
        total = int(properties.total_memory)
        source = "device"
        if memory_limit is not None and memory_limit < total:
            # The allocator refuses to grow past this fraction with a real torch.OutOfMemoryError.
            cuda.set_per_process_memory_fraction(memory_limit / total, index)
            total, source = memory_limit, "--memory-limit"
        self.info = DeviceInfo(f"cuda:{index} ({properties.name})", "cuda", total, source, exact=True)

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        yield

    def reset_peak(self) -> None:
        self.cuda.reset_peak_memory_stats(self.index)

    def peak_bytes(self) -> int:
        return int(self.cuda.max_memory_allocated(self.index))

    def current_bytes(self) -> int:
        return int(self.cuda.memory_allocated(self.index))

    def release(self) -> None:
        self.cuda.synchronize(self.index)
        self.cuda.empty_cache()

    def synchronize(self) -> None:
        self.cuda.synchronize(self.index)


# What a probe without --memory-limit leaves of the memory available (available_reserve).
RESERVE_FRACTION, RESERVE_BYTES = 0.1, 2**30


def available_reserve(available: int) -> int:
    """What a probe without --memory-limit leaves of the memory available: MemAvailable is no edge
    to aim at. Long before the tensors fill it the kernel reclaims the pages of running code and the
    machine thrashes (measured: a probe aiming at 22.9 GiB hung past 3 minutes at its first jump).
    The reserve covers the code's pages and the heap and scratch memory the tensors do not count."""
    return int(available * RESERVE_FRACTION) + RESERVE_BYTES


class CpuDevice:
    """The CPU with every tensor byte counted against a limit (cpumem.TensorBytesLimit): the
    `--memory-limit` if given, else the memory the OS says is available. A lower limit from outside
    the process (rlimit, cgroup) bites first and is recognised as out-of-memory, but its edge is
    a band, so the result says it is not exact."""

    def __init__(self, memory_limit: int | None) -> None:
        self.torch_device = torch.device("cpu")
        self.notes = []
        self.outside_limit: str | None = None
        outside = host_limits()
        tightest = min(outside, key=lambda limit: limit.remaining_bytes, default=None)
        if memory_limit is not None:
            limit, source = memory_limit, "--memory-limit"
        elif tightest is not None:
            limit, source = tightest.remaining_bytes, tightest.source
            reserve = ""
            if source == "MemAvailable":
                kept = available_reserve(limit)
                limit, reserve = max(0, limit - kept), f" less {format_bytes(kept)} kept for the OS"
            self.notes.append(
                f"no --memory-limit: limited to what {tightest.source} allowed at start{reserve} "
                f"({format_bytes(limit)}); give --memory-limit for a reproducible number"
            )
        else:
            raise BadInput("cannot tell how much memory this machine has: give --memory-limit")
        exact = source in ("--memory-limit", "MemAvailable")
        if tightest is not None and tightest.source != "MemAvailable" and tightest.remaining_bytes <= limit:
            exact, self.outside_limit = False, tightest.source
            self.notes.append(
                f"a limit from outside the process applies ({tightest.source}, {format_bytes(tightest.remaining_bytes)} left): "
                "its edge moves between runs, so max_batch was re-checked and is a band, not an exact number"
            )
        self.info = DeviceInfo("cpu", "cpu", limit, source, exact)
        self._counter = TensorBytesLimit(limit)

    def tracking(self) -> contextlib.AbstractContextManager[None]:
        return self._counter  # type: ignore[return-value]

    def reset_peak(self) -> None:
        self._counter.reset_peak()

    def peak_bytes(self) -> int:
        return self._counter.peak_bytes

    def current_bytes(self) -> int:
        return self._counter.current_bytes

    def release(self) -> None:
        trim_heap()

    def synchronize(self) -> None:
        """CPU kernels finish before they return."""


def open_device(spec: str | None, memory_limit: int | None) -> Device:
    """`--device` to a backend: cuda[:N] or cpu; None picks cuda:0 when CUDA is available."""
    if spec is None:
        spec = "cuda:0" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", spec.strip().lower())
    if match is None:
        raise BadInput(f"unknown device {spec!r}: use cpu, cuda or cuda:N")
    if match.group(1) == "cpu":
        return CpuDevice(memory_limit)
    index = int(match.group(2) or 0)
    if not torch.cuda.is_available():
        raise BadInput(f"{spec} was asked for but CUDA is not available here: use --device cpu")
    if index >= torch.cuda.device_count():
        raise BadInput(f"{spec} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return CudaDevice(index, memory_limit)
