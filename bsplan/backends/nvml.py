"""The one module that talks to NVML (nvidia-ml-py's `pynvml`), imported lazily on first query;
`query` adds the AMD GPUs that AMD SMI lists (backends/amd.py), as NVML sees NVIDIA GPUs only.

No driver, no library or no GPU becomes one sentence (`GpuReport.unavailable`), never an exception;
a value NVML will not give for one device (the processes, without permission or under MIG) is None.
Tests pass a fake `pynvml` module to `query` (as gpustat's tests do), so nothing here needs a GPU.

NVML numbers devices by PCI bus and ignores CUDA_VISIBLE_DEVICES; CUDA numbers them fastest first
unless CUDA_DEVICE_ORDER=PCI_BUS_ID, after CUDA_VISIBLE_DEVICES has picked and ordered them.
`cuda_indices` maps one to the other.

Where neither lists a GPU, the one sentence says why for both, and that torch is a ROCm build if it is.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from bsplan.backends import amd
from bsplan.planning.record import Record

# What a failed nvmlInit means, by the error's class name (the same in pynvml and in test fakes).
_WHY_UNAVAILABLE = {
    "NVMLError_LibraryNotFound": "no NVIDIA driver here (NVML's library libnvidia-ml.so was not found)",
    "NVMLError_DriverNotLoaded": "the NVIDIA driver is not loaded",
    "NVMLError_NoPermission": "NVML refused access to the GPUs (no permission)",
}


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None where NVML does not report it (Windows WDDM, some containers)


@dataclass(frozen=True)
class Gpu(Record):
    """One device as NVML (or AMD SMI) sees it, with its CUDA index under this process's environment."""

    index: int  # NVML's index (PCI bus order); AMD SMI's for an AMD GPU
    name: str
    uuid: str
    pci_bus_id: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[GpuProcess, ...] | None  # None: NVML would not list them
    cuda_index: int | None = None  # None: hidden by CUDA_VISIBLE_DEVICES, or not known (see cuda_order; AMD: HIP's order)
    cuda_index_certain: bool = False
    vendor: str = "NVIDIA"  # or "AMD", listed through AMD SMI


@dataclass(frozen=True)
class GpuReport:
    gpus: tuple[Gpu, ...]
    driver_version: str | None
    unavailable: str | None  # one sentence when there is no GPU to report, else None
    cuda_order: str = ""  # how CUDA indices were found, for people
    amd_driver_version: str | None = None  # where AMD SMI listed AMD GPUs


def query(environ: Mapping[str, str], nvml: ModuleType | None = None) -> GpuReport:
    """The GPUs NVML sees, with memory, processes and CUDA indices, then the AMD GPUs AMD SMI sees
    (memory only); `nvml` replaces pynvml in tests."""
    report = _query(environ, nvml)
    found = amd.query()
    if found.gpus:
        listed = tuple(Gpu(index, gpu.name, gpu.uuid, gpu.pci_bus_id, gpu.total_bytes, gpu.used_bytes,
                           gpu.total_bytes - gpu.used_bytes, None, vendor="AMD") for index, gpu in enumerate(found.gpus))
        return replace(report, gpus=report.gpus + listed, unavailable=None, amd_driver_version=found.driver_version)
    if report.unavailable is None:
        return report
    rocm = f"torch here is a ROCm build (HIP {hip}) and " if (hip := torch_hip_version()) else ""
    return replace(report, unavailable=f"{report.unavailable}; {rocm}NVML does not list AMD GPUs: {found.unavailable}")


def torch_hip_version() -> str | None:
    """torch.version.hip without importing torch (`bsplan gpus` stays fast and torch-free): from torch
    if it is already imported, else from the installed torch's version.py; None on a CUDA or CPU build."""
    if "torch" in sys.modules:
        return getattr(sys.modules["torch"].version, "hip", None)
    spec = importlib.util.find_spec("torch")
    version = Path(next(iter(spec.submodule_search_locations or ()), "")) / "version.py" if spec else None
    if version is None or not version.is_file():
        return None
    found = re.search(r"^hip\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", version.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def _query(environ: Mapping[str, str], nvml: ModuleType | None) -> GpuReport:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return GpuReport((), None, "nvidia-ml-py is not installed, so bsplan cannot ask NVML: pip install nvidia-ml-py")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return GpuReport((), None, _WHY_UNAVAILABLE.get(type(error).__name__, f"NVML could not start: {error}"))
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return GpuReport((), _text(nvml.nvmlSystemGetDriverVersion()), "no NVIDIA GPU: the driver sees none")
        gpus = [_device(nvml, index) for index in range(count)]
        driver = _text(nvml.nvmlSystemGetDriverVersion())
    except nvml.NVMLError as error:
        return GpuReport((), None, f"NVML failed while listing the GPUs: {error}")
    finally:
        nvml.nvmlShutdown()
    mapping, certain, how = cuda_indices(gpus, environ.get("CUDA_VISIBLE_DEVICES"), environ.get("CUDA_DEVICE_ORDER"))
    placed = tuple(replace(gpu, cuda_index=mapping.get(gpu.index), cuda_index_certain=certain) for gpu in gpus)
    return GpuReport(placed, driver, None, how)


def _device(nvml: ModuleType, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return Gpu(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        total_bytes=int(memory.total),
        used_bytes=int(memory.used),
        free_bytes=int(memory.free),
        processes=_processes(nvml, handle),
    )


def _processes(nvml: ModuleType, handle: Any) -> tuple[GpuProcess, ...] | None:
    """Compute and graphics processes holding memory, each pid once; None where NVML refuses."""
    try:
        listed = [*nvml.nvmlDeviceGetComputeRunningProcesses(handle), *nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)]
    except nvml.NVMLError:
        return None
    by_pid = {int(p.pid): None if p.usedGpuMemory is None else int(p.usedGpuMemory) for p in listed}
    return tuple(GpuProcess(pid, used) for pid, used in sorted(by_pid.items()))


def _text(value: bytes | str) -> str:
    """Old pynvml versions return bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def cuda_indices(gpus: list[Gpu], visible: str | None, order: str | None) -> tuple[dict[int, int], bool, str]:
    """NVML index -> CUDA index, whether that is certain, and how it was found.

    CUDA enumerates in PCI bus order with CUDA_DEVICE_ORDER=PCI_BUS_ID; its default, FASTEST_FIRST,
    ranks by a speed heuristic, which leaves identical GPUs in PCI bus order only by assumption and
    mixed models in an order bsplan cannot know. CUDA_VISIBLE_DEVICES then lists the devices CUDA
    exposes, in its order: CUDA indices (in that enumeration) or UUIDs ("GPU-..." or a unique
    prefix); the list ends at the first entry that names no device (CUDA's rule), and "" hides all.
    """
    by_bus = sorted(gpus, key=lambda gpu: gpu.pci_bus_id.lower())
    pci_order = (order or "").strip().upper() == "PCI_BUS_ID"
    identical = len({gpu.name for gpu in gpus}) <= 1
    enumeration = by_bus if pci_order or identical else None
    if pci_order:
        how = "certain: CUDA_DEVICE_ORDER=PCI_BUS_ID, the order NVML uses"
    elif identical:
        how = "assumed: identical GPUs enumerated in PCI bus order; set CUDA_DEVICE_ORDER=PCI_BUS_ID to be certain"
    else:
        how = "unknown: mixed GPU models in CUDA's default fastest-first order; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
    if visible is None:
        chosen = enumeration
    else:
        chosen = _visible(visible, gpus, enumeration)
        how += f"; CUDA_VISIBLE_DEVICES={visible!r}"
    if chosen is None:
        return {}, False, how
    return {gpu.index: cuda for cuda, gpu in enumerate(chosen)}, pci_order, how


def _visible(visible: str, gpus: list[Gpu], enumeration: list[Gpu] | None) -> list[Gpu] | None:
    """The devices CUDA_VISIBLE_DEVICES exposes, in its order; None when an index entry cannot be
    resolved because the enumeration order is unknown."""
    chosen: list[Gpu] = []
    for entry in (part.strip() for part in visible.split(",")) if visible.strip() else ():
        if entry.isdigit():
            if enumeration is None:
                return None
            found = enumeration[int(entry)] if int(entry) < len(enumeration) else None
        else:
            prefix = entry.lower() if entry.lower().startswith("gpu-") else f"gpu-{entry.lower()}"
            candidates = [gpu for gpu in gpus if gpu.uuid.lower().startswith(prefix)]
            found = candidates[0] if len(candidates) == 1 else None
        if found is None or found in chosen:
            break
        chosen.append(found)
    return chosen
