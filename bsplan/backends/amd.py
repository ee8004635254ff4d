"""The one module that talks to AMD SMI (its Python package `amdsmi`, shipped with ROCm), imported
lazily on first query: NVML lists NVIDIA GPUs only, so `bsplan gpus` lists AMD GPUs through this.

Not installed, no driver or no GPU becomes one sentence (`AmdReport.unavailable`), never an
exception. Tests put a fake `amdsmi` module in sys.modules, so nothing here needs a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AmdGpu:
    name: str
    uuid: str
    pci_bus_id: str
    total_bytes: int  # VRAM
    used_bytes: int


@dataclass(frozen=True)
class AmdReport:
    gpus: tuple[AmdGpu, ...]
    driver_version: str | None
    unavailable: str | None  # one sentence when there is no AMD GPU to report, else None


def query() -> AmdReport:
    """The AMD GPUs AMD SMI sees, in its order, with their VRAM total and used."""
    try:
        import amdsmi
    except ImportError:
        return AmdReport((), None, "install AMD SMI's Python package (amdsmi) to list them here, or run amd-smi or rocm-smi")
    except OSError as error:  # the package is there, its libamd_smi.so is not
        return AmdReport((), None, f"AMD SMI could not load its library: {error}")
    try:
        amdsmi.amdsmi_init()
    except amdsmi.AmdSmiException as error:
        return AmdReport((), None, f"AMD SMI could not start: {error}")
    try:
        handles = amdsmi.amdsmi_get_processor_handles()
        if not handles:
            return AmdReport((), None, "AMD SMI sees no AMD GPU")
        vram = amdsmi.AmdSmiMemoryType.VRAM
        gpus = tuple(
            AmdGpu(
                name=str(amdsmi.amdsmi_get_gpu_asic_info(handle).get("market_name", "AMD GPU")),
                uuid=str(amdsmi.amdsmi_get_gpu_device_uuid(handle)),
                pci_bus_id=str(amdsmi.amdsmi_get_gpu_device_bdf(handle)),
                total_bytes=int(amdsmi.amdsmi_get_gpu_memory_total(handle, vram)),
                used_bytes=int(amdsmi.amdsmi_get_gpu_memory_usage(handle, vram)),
            )
            for handle in handles
        )
        driver = amdsmi.amdsmi_get_gpu_driver_info(handles[0]).get("driver_version")
        driver = None if driver is None else str(driver)
    except amdsmi.AmdSmiException as error:
        return AmdReport((), None, f"AMD SMI failed while listing the GPUs: {error}")
    finally:
        amdsmi.amdsmi_shut_down()
    return AmdReport(gpus, driver, None)
