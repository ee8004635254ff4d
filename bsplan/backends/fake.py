"""A CPU with no memory behind its tensors: under torch's FakeTensorMode every tensor has its shape,
dtype and device but no storage, and every operator runs only its shape function. The same
TensorBytesLimit as the counted CPU limit counts the bytes each storage would take, so a traced
step has, to the byte, the peak a real one has under `--memory-limit`, without the memory or the
compute: a model of any size traces on a laptop (measure/trace.py)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from bsplan.backends.cpu import TensorBytesLimit
from bsplan.planning.results import DeviceInfo
from bsplan.planning.units import format_bytes


class FakeDevice:
    """The CPU traced with fake tensors, every would-be byte counted against `limit_bytes`."""

    outside_limit = None
    counts_tensors = True

    def __init__(self, limit_bytes: int, name: str) -> None:
        self.torch_device = torch.device("cpu")
        self.info = DeviceInfo(name, "cpu", limit_bytes, "traced", exact=True)
        self.notes = [f"traced with fake tensors, every tensor byte counted against {format_bytes(limit_bytes)}"]
        self.counter = TensorBytesLimit(limit_bytes)
        self._mode = FakeTensorMode()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        # The fake mode outside, the counter inside: the counter sees each operator's fake outputs.
        with self._mode, self.counter, warnings.catch_warnings():
            # a deep copy of a fake tensor asks for its data pointer (nn.TransformerEncoder copies its layer
            # while built); the answer changes nothing allocated, and the warning would reach the user
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            yield

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with every tensor in this device's fake mode. A deep copy of a fake tensor lands
        in a fake mode of its own (torch's FakeTensor.__deepcopy__), and models deep-copy their
        layers as they are built (nn.TransformerEncoder clones its layer N times): those tensors are
        made again here, same shape, strides, dtype and requires_grad (ties kept), or the first
        operator that mixes them with this mode's fails."""
        remade: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if isinstance(tensor, FakeTensor) and tensor.fake_mode is not self._mode:
                        if id(tensor) not in remade:
                            fresh = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
                            is_parameter = isinstance(tensor, torch.nn.Parameter) or table is module._parameters
                            remade[id(tensor)] = torch.nn.Parameter(fresh, tensor.requires_grad) if is_parameter else fresh
                        table[name] = remade[id(tensor)]
        return model

    def reset_peak(self) -> None:
        self.counter.reset_peak()

    def peak_bytes(self) -> int:
        return self.counter.peak_bytes

    def limit_peak_bytes(self) -> int:
        return self.counter.peak_bytes

    def current_bytes(self) -> int:
        return self.counter.current_bytes

    def release(self) -> None:
        """Nothing was allocated."""

    def synchronize(self) -> None:
        """Nothing runs."""

    def stepping(self) -> contextlib.AbstractContextManager[None]:
        return _ScalarsReadAsOne()


class _ScalarsReadAsOne(TorchDispatchMode):
    """An optimizer's step may read a value (Adafactor reads its step count and each parameter's RMS with
    .item()), which a fake tensor does not have. In torch's own optimizers such a value only scales an
    update, it never sizes a tensor, so it is read as 1 and the step's allocations stay exact; the trial
    asks for this around their steps only (measure/trial.py). Elsewhere a read stays an error: there a
    value can size a tensor, and the estimate then runs real steps."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            return func(*args, **(kwargs or {}))
        except DataDependentOutputException:
            if func is not torch.ops.aten._local_scalar_dense.default:
                raise
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1.0 if dtype.is_floating_point or dtype.is_complex else 1
