"""The CPU as a device: every tensor byte counted against a limit, exactly and reproducibly.

`--memory-limit` is enforced by counting the bytes of live tensor storages, which is what a CUDA
allocator's counters report, so the CPU stands in for a GPU of any size. A lower limit from
outside the process (backends/host.py) bites first and is recognised as out-of-memory, but its
edge is a band, so the result says it is not exact.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from bsplan.backends.host import UsageMeter, host_limits, outside_limit, trim_heap
from bsplan.planning.errors import BadInput
from bsplan.planning.results import DeviceInfo
from bsplan.planning.units import format_bytes


class StorageObserver(Protocol):
    """What sees the counting from inside (measure/attribution.py): each storage as it is first
    counted, and the live storages (id -> (weakref, bytes)) each time the peak rises."""

    def counted(self, key: int) -> None: ...
    def peaked(self, live: dict[int, tuple[Any, int]]) -> None: ...


class TensorBytesLimit(TorchDispatchMode):
    """Counts the bytes of live CPU tensor storages, keeps the peak, and raises
    torch.OutOfMemoryError when an allocation takes the count past the limit.

    Each storage is counted once (views share it) and uncounted by a weakref callback when it is
    freed. The allocation has happened when the check runs; raising drops it again, as the
    exception unwinds. With a `meter` (what a limit from outside the process counts) it also keeps
    the meter's peak, read after every operator.
    """

    def __init__(self, limit_bytes: int, meter: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.current_bytes = 0
        self.peak_bytes = 0
        self.meter = meter
        self.meter_peak_bytes = 0
        self.observer: StorageObserver | None = None
        self._live: dict[int, tuple[weakref.ref[Any], int]] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Opt out of torch wrapping __torch_dispatch__ in torch._dynamo.disable (PyTorch's documented
        switch): counting needs no compile guard, and the wrapper adds a call to every operator."""
        return False

    def __enter__(self) -> TensorBytesLimit:
        # FSDP frees and re-allocates its gathered parameters with UntypedStorage.resize_, which
        # no operator reports: count those resizes too, while the limit is active.
        self._resize = resize = torch.UntypedStorage.resize_

        def counted_resize(storage: torch.UntypedStorage, size: int) -> Any:
            result = resize(storage, size)
            # A storage counted before is one of ours: a fake tensor's reports the device "meta".
            if storage.device.type == "cpu" or id(storage) in self._live:
                self._count(storage)
            self._read_meter()
            return result

        torch.UntypedStorage.resize_ = counted_resize  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
        self.meter_peak_bytes = 0 if self.meter is None else self.meter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None  # the inputs' storages, read only when an output's is new
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                for storage in tensor_storages(tensor):
                    if id(storage) not in self._live and func not in _FRESH:
                        inputs = _storage_ids((args, kwargs)) if inputs is None else inputs
                        if id(storage) in inputs:
                            continue  # a view of an input allocated before counting began (a dataset's rows): no allocation
                    self._count(storage)
        self._read_meter()
        return out

    def _read_meter(self) -> None:
        if self.meter is not None:
            self.meter_peak_bytes = max(self.meter_peak_bytes, self.meter())

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        known = self._live.get(key)
        grown = size - (known[1] if known else 0)
        if grown == 0:
            return
        self._live[key] = (known[0] if known else weakref.ref(storage, lambda _, key=key: self._forget(key)), size)
        if known is None and self.observer is not None:
            self.observer.counted(key)
        self.current_bytes += grown
        if self.current_bytes > self.limit_bytes:
            # Worded as PyTorch's CPU allocator words it, so that code which recognises a real CPU
            # out-of-memory by its message (Lightning's is_oom_error, say) recognises this one too.
            raise torch.OutOfMemoryError(
                f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {grown} bytes "
                f"(bsplan's limit: {format_bytes(self.current_bytes - grown)} of {format_bytes(self.limit_bytes)} already in use)"
            )
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            if self.observer is not None:
                self.observer.peaked(self._live)

    def _forget(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current_bytes -= entry[1]


# torch.tensor(data) allocates outside the dispatcher, then hands the new tensor to lift_fresh: an
# allocation that reaches the count as its input.
_FRESH = (torch.ops.aten.lift_fresh.default,)


def _storage_ids(values: Any) -> set[int]:
    """The storages of the CPU tensors among values (an operator's arguments)."""
    return {id(storage) for value in tree_flatten(values)[0] if isinstance(value, torch.Tensor) and value.device.type == "cpu"
            for storage in tensor_storages(value)}


def tensor_storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold a tensor's bytes: a wrapper subclass's (FSDP's DTensor) are its inner
    tensors' (a DTensor's own storage reports the global size, not this rank's shard)."""
    if is_traceable_wrapper_subclass(tensor):
        inner = (getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
        return [storage for part in inner if isinstance(part, torch.Tensor) for storage in tensor_storages(part)]
    return [tensor.untyped_storage()]


# What a probe without --memory-limit leaves of the memory available (available_reserve).
RESERVE_FRACTION, RESERVE_BYTES = 0.1, 2**30


def available_reserve(available: int) -> int:
    """What a probe without --memory-limit leaves of the memory available: MemAvailable is no edge
    to aim at. Long before the tensors fill it the kernel reclaims the pages of running code and the
    machine thrashes (measured: a probe aiming at 22.9 GiB hung past 3 minutes at its first jump).
    The reserve covers the code's pages and the heap and scratch memory the tensors do not count."""
    return int(available * RESERVE_FRACTION) + RESERVE_BYTES


class CpuDevice:
    """The CPU with every tensor byte counted against a limit (TensorBytesLimit): the
    `--memory-limit` if given, else the memory the OS says is available. A lower limit from outside
    the process (rlimit, cgroup) bites first and is recognised as out-of-memory, but its edge is
    a band, so the result says it is not exact.

    With `count_tensors=False`, where a limit from outside the process sets the edge, nothing is
    counted: the trial process of such a probe runs as a plain training process does, and its peaks
    are the limit's own meter. Counting runs every operator through Python, and that alone moved the
    edge (docs/probe.md: examples/transformer.py fitted batch 8 in 3 of 3 processes under a no-op
    dispatch mode, in 0 of 3 without)."""

    def __init__(self, memory_limit: int | None, count_tensors: bool = True) -> None:
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
        exact, meter = source in ("--memory-limit", "MemAvailable"), None
        binding = outside_limit(outside, memory_limit)
        if binding is not None:
            exact, self.outside_limit, meter = False, binding.source, UsageMeter(binding)
            self.notes.append(
                f"a limit from outside the process applies ({binding.source}, {format_bytes(binding.remaining_bytes)} left): "
                "its edge moves between runs, so max_batch was re-checked and is a band, not an exact number"
            )
        self.info = DeviceInfo("cpu", "cpu", limit, source, exact)
        self._counter = TensorBytesLimit(limit, meter)
        self._meter = meter if meter is not None and not count_tensors else None  # uncounted: the meter alone
        self.counts_tensors = self._meter is None
        if self._meter:
            self._meter.sample()

    def tracking(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self._meter else self._counter  # type: ignore[return-value]

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.torch_device)

    def reset_peak(self) -> None:
        """Uncounted, the peak stays the process's: a trial process is fresh, so it is the trial's."""
        self._counter.reset_peak()

    def peak_bytes(self) -> int:
        return self._meter.peak() if self._meter else self._counter.peak_bytes

    def limit_peak_bytes(self) -> int:
        """Under a limit from outside the process, the peak of what it counts since the device opened."""
        if self._meter:
            return self._meter.peak()
        counter = self._counter
        return counter.peak_bytes if counter.meter is None else counter.meter_peak_bytes

    def current_bytes(self) -> int:
        return self._meter() if self._meter else self._counter.current_bytes

    def release(self) -> None:
        trim_heap()

    def stepping(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """CPU kernels finish before they return."""
