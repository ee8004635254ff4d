"""`bsplan gpus`: the catalogue and its loose names, NVML through a fake pynvml, CUDA indices."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import bsplan
from no_torch import run_without_torch
from typer.testing import CliRunner

from bsplan.backends import nvml
from bsplan.backends.nvml import Gpu, cuda_indices, query
from bsplan.cli import app as cli
from bsplan.planning.catalog import CATALOG, MIB, find_gpu, match_nvml_name
from bsplan.planning.errors import BadInput

# --- the catalogue -----------------------------------------------------------------------------


def test_the_catalogue_has_the_gpus_the_issue_asks_for_each_once() -> None:
    keys = [gpu.key for gpu in CATALOG]
    assert len(keys) == len(set(keys)) and len({gpu.name for gpu in CATALOG}) == len(CATALOG)
    for name in ("V100-16GB", "V100-32GB", "T4", "A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-SXM",
                 "H100-PCIe", "H200", "RTX 3090", "RTX 4090", "RTX A6000"):
        find_gpu(name)  # each resolves to exactly one memory size
    for gpu in CATALOG:
        assert gpu.memory_bytes > 15_000 * MIB and gpu.bandwidth_gb_per_s > 0
        assert gpu.bf16_tflops is None or gpu.bf16_tflops > 0
        assert gpu.bf16_tflops is not None or "no bf16" in gpu.note


def test_the_docs_give_a_source_for_every_gpu() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "gpus.md").read_text()
    for gpu in CATALOG:
        assert f"| `{gpu.key}` |" in text, gpu.key


@pytest.mark.parametrize(("name", "key"), [
    ("h100", "H100-SXM-80GB"),  # SXM and PCIe have the same memory: the first listed
    ("H100-80GB", "H100-SXM-80GB"),
    ("h100 pcie", "H100-PCIE-80GB"),
    ("NVIDIA H100 80GB HBM3", "H100-SXM-80GB"),
    ("a100-40gb", "A100-SXM4-40GB"),
    ("A100_80GB", "A100-SXM4-80GB"),
    ("rtx4090", "RTX-4090-24GB"),
    ("3090", "RTX-3090-24GB"),
    ("a6000", "RTX-A6000-48GB"),
    ("L4", "L4-24GB"),
    ("l40s", "L40S-48GB"),
    ("t4", "T4-16GB"),
    ("A10G", "A10G-24GB"),
    ("h200", "H200-SXM-141GB"),
])
def test_names_match_loosely(name: str, key: str) -> None:
    assert find_gpu(name).key == key


def test_a_name_that_fits_gpus_of_different_memory_lists_them() -> None:
    with pytest.raises(BadInput, match="A100-SXM4-40GB, A100-SXM4-80GB; name one"):
        find_gpu("a100")


def test_an_unknown_name_is_one_sentence_with_close_matches() -> None:
    with pytest.raises(BadInput, match=r"'B100' is not in the catalogue.*bsplan gpus --catalog") as raised:
        find_gpu("B100")
    assert "\n" not in str(raised.value)
    with pytest.raises(BadInput, match=r"close: .*H100-SXM-80GB"):
        find_gpu("H1000")


def test_nvml_names_map_to_the_catalogue() -> None:
    assert match_nvml_name("NVIDIA A100-SXM4-80GB").key == "A100-SXM4-80GB"  # type: ignore[union-attr]
    assert match_nvml_name("NVIDIA B100") is None


# --- NVML, faked at the module seam -------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's name
    pass


class NVMLError_NoPermission(NVMLError):  # noqa: N801
    pass


def fake_nvml(devices: list[dict[str, Any]], init_error: Exception | None = None) -> SimpleNamespace:
    """A stand-in for pynvml with the calls nvml.py makes; devices are dicts of what each reports."""
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def processes(kind: str):
        def listed(handle: int) -> list[SimpleNamespace]:
            found = devices[handle].get(kind, [])
            if isinstance(found, Exception):
                raise found
            return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in found]
        return listed

    return SimpleNamespace(
        NVMLError=NVMLError, calls=calls, nvmlInit=init, nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(devices), nvmlSystemGetDriverVersion=lambda: b"560.35.03",
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda h: devices[h]["name"].encode(),  # old pynvml returns bytes
        nvmlDeviceGetUUID=lambda h: devices[h]["uuid"],
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=devices[h]["bus"]),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 * 2**30, used=devices[h].get("used", 0),
                                                          free=80 * 2**30 - devices[h].get("used", 0)),
        nvmlDeviceGetComputeRunningProcesses=processes("compute"),
        nvmlDeviceGetGraphicsRunningProcesses=processes("graphics"),
    )


TWO_H100 = [
    {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa1111", "bus": "00000000:18:00.0", "used": 5 * 2**30,
     "compute": [(4242, 5 * 2**30), (77, None)], "graphics": [(77, None)]},
    {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-bbbb2222", "bus": "00000000:2A:00.0", "compute": NVMLError_NoPermission()},
]


def test_devices_memory_and_processes_come_from_nvml() -> None:
    fake = fake_nvml(TWO_H100)
    report = query({}, fake)  # type: ignore[arg-type]
    assert report.unavailable is None and report.driver_version == "560.35.03"
    first, second = report.gpus
    assert (first.name, first.uuid, first.used_bytes, first.free_bytes) == ("NVIDIA H100 80GB HBM3", "GPU-aaaa1111", 5 * 2**30, 75 * 2**30)
    assert [(p.pid, p.used_bytes) for p in first.processes] == [(77, None), (4242, 5 * 2**30)]  # type: ignore[union-attr]
    assert second.processes is None  # NVML refused: not available, not an error
    assert (first.cuda_index, second.cuda_index) == (0, 1) and not first.cuda_index_certain
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize(("fake", "sentence"), [
    (fake_nvml([], NVMLError_LibraryNotFound()), "no NVIDIA driver here"),
    (fake_nvml([], NVMLError("Unknown Error")), "NVML could not start: Unknown Error"),
    (fake_nvml([]), "no NVIDIA GPU: the driver sees none"),
])
def test_no_driver_or_no_gpu_is_one_sentence(fake: SimpleNamespace, sentence: str) -> None:
    report = query({}, fake)  # type: ignore[arg-type]
    assert report.gpus == () and sentence in report.unavailable  # type: ignore[operator]


def _run_cli(monkeypatch: pytest.MonkeyPatch, fake: SimpleNamespace, *args: str) -> Any:
    """The real command in-process, with the fake at nvml.query's seam."""
    monkeypatch.setattr(nvml, "query", lambda environ: query(environ, fake))  # type: ignore[arg-type]
    monkeypatch.setattr(cli, "stdout", cli.Console(width=200, highlight=False))
    return CliRunner().invoke(cli.app, ["gpus", *args])


def test_gpus_table_and_json_with_a_fake_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    table = _run_cli(monkeypatch, fake_nvml(TWO_H100))
    assert table.exit_code == 0, table.output
    assert "NVIDIA H100 80GB HBM3" in table.output and "4242: 5 GiB" in table.output and "not available" in table.output
    assert "H100-SXM-80GB" in table.output and "CUDA_VISIBLE_DEVICES='GPU-bbbb'" in table.output
    rows = json.loads(_run_cli(monkeypatch, fake_nvml(TWO_H100), "--json").output)
    assert [(row["index"], row["cuda_index"]) for row in rows] == [(0, None), (1, 0)]
    assert rows[0]["processes"][1] == {"pid": 4242, "used_bytes": 5 * 2**30} and rows[1]["processes"] is None


def test_without_a_driver_gpus_says_so_in_one_line_and_exits_0(workdir: Path) -> None:
    run = bsplan("gpus", cwd=workdir)  # this machine has no NVIDIA driver; nvidia-ml-py is installed
    assert run.code == 0 and run.stderr == ""
    assert run.stdout.count("\n") == 1 and run.stdout.startswith("no GPU to list:")
    as_json = bsplan("gpus", "--json", cwd=workdir)
    assert as_json.code == 0 and as_json.json() == [] and as_json.stderr.startswith("no GPU to list:")


def test_gpus_and_the_catalogue_never_import_torch(workdir: Path) -> None:
    run_without_torch("gpus", cwd=workdir)
    rows = json.loads(run_without_torch("gpus", "--catalog", "--json", cwd=workdir))
    assert {row["key"] for row in rows} == {gpu.key for gpu in CATALOG}


# --- CUDA indices (a pure function) -----------------------------------------------------------


def _gpu(index: int, bus: str, uuid: str, name: str = "NVIDIA A100-SXM4-80GB") -> Gpu:
    return Gpu(index, name, uuid, bus, 1, 0, 1, ())


FOUR = [_gpu(0, "0000:07:00.0", "GPU-0aaa"), _gpu(1, "0000:0B:00.0", "GPU-1bbb"),
        _gpu(2, "0000:48:00.0", "GPU-2ccc"), _gpu(3, "0000:4C:00.0", "GPU-3ddd")]
MIXED = [_gpu(0, "0000:07:00.0", "GPU-0aaa", "NVIDIA GeForce RTX 3090"), _gpu(1, "0000:0B:00.0", "GPU-1bbb")]


@pytest.mark.parametrize(("gpus", "visible", "order", "expected", "certain"), [
    (FOUR, None, "PCI_BUS_ID", {0: 0, 1: 1, 2: 2, 3: 3}, True),
    (FOUR, "2,0", "PCI_BUS_ID", {2: 0, 0: 1}, True),
    (FOUR, "3,9,1", "PCI_BUS_ID", {3: 0}, True),  # CUDA ignores everything after an invalid entry
    (FOUR, "1,1", "PCI_BUS_ID", {1: 0}, True),
    (FOUR, "", "PCI_BUS_ID", {}, True),  # an empty list hides every GPU
    (FOUR, "GPU-2c,GPU-0aaa", None, {2: 0, 0: 1}, False),  # UUID prefixes; the default order is assumed
    (FOUR, "3ddd", None, {3: 0}, False),
    (FOUR, "GPU-", None, {}, False),  # a prefix that fits several devices names none
    (FOUR, None, "FASTEST_FIRST", {0: 0, 1: 1, 2: 2, 3: 3}, False),  # identical GPUs: PCI order, assumed
    (MIXED, None, None, {}, False),  # mixed models, fastest first: unknown
    (MIXED, "1", None, {}, False),
    (MIXED, "GPU-1bbb", None, {1: 0}, False),  # a UUID needs no order
    (MIXED, "0", "pci_bus_id", {0: 0}, True),
])
def test_cuda_indices(gpus: list[Gpu], visible: str | None, order: str | None, expected: dict[int, int], certain: bool) -> None:
    mapping, is_certain, how = cuda_indices(gpus, visible, order)
    assert mapping == expected and is_certain == certain
    assert how.split(":")[0] in ("certain", "assumed", "unknown")


def test_the_enumeration_follows_the_pci_bus_not_nvml_s_numbering() -> None:
    shuffled = [_gpu(0, "0000:4C:00.0", "GPU-x"), _gpu(1, "0000:07:00.0", "GPU-y")]
    assert cuda_indices(shuffled, "0", "PCI_BUS_ID")[0] == {1: 0}


# --- AMD GPUs through AMD SMI, faked in sys.modules ---------------------------------------------


class AmdSmiException(Exception):
    pass


MI300X = [{"name": "AMD Instinct MI300X", "uuid": "a1ff74a1-0000-1000-80ff-ffff", "bus": "0000:0c:00.0", "used": 3 * 2**30},
          {"name": "AMD Instinct MI300X", "uuid": "a2ff74a1-0000-1000-80ff-ffff", "bus": "0000:22:00.0", "used": 0}]


def fake_amdsmi(devices: list[dict[str, Any]], init_error: Exception | None = None) -> SimpleNamespace:
    """A stand-in for amdsmi with the calls amd.py makes; devices are dicts of what each reports."""
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def vram(handle: int, kind: str, value: int) -> int:
        assert kind == "vram", "only VRAM is the GPU's memory (GTT is host memory)"
        return value

    return SimpleNamespace(
        AmdSmiException=AmdSmiException, AmdSmiMemoryType=SimpleNamespace(VRAM="vram", GTT="gtt"), calls=calls,
        amdsmi_init=init, amdsmi_shut_down=lambda: calls.append("shutdown"),
        amdsmi_get_processor_handles=lambda: list(range(len(devices))),
        amdsmi_get_gpu_asic_info=lambda h: {"market_name": devices[h]["name"], "vendor_id": 4098},
        amdsmi_get_gpu_device_uuid=lambda h: devices[h]["uuid"],
        amdsmi_get_gpu_device_bdf=lambda h: devices[h]["bus"],
        amdsmi_get_gpu_memory_total=lambda h, kind: vram(h, kind, 192 * 10**9),
        amdsmi_get_gpu_memory_usage=lambda h, kind: vram(h, kind, devices[h]["used"]),
        amdsmi_get_gpu_driver_info=lambda h: {"driver_name": "amdgpu", "driver_version": "6.10.5"},
    )


NO_NVIDIA_DRIVER = fake_nvml([], NVMLError_LibraryNotFound())


def test_amd_gpus_are_listed_through_amdsmi_after_the_nvidia_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    amdsmi = fake_amdsmi(MI300X)
    monkeypatch.setitem(sys.modules, "amdsmi", amdsmi)
    report = query({}, fake_nvml(TWO_H100))  # type: ignore[arg-type]
    assert report.unavailable is None and (report.driver_version, report.amd_driver_version) == ("560.35.03", "6.10.5")
    assert [(gpu.vendor, gpu.index) for gpu in report.gpus] == [("NVIDIA", 0), ("NVIDIA", 1), ("AMD", 0), ("AMD", 1)]
    first = report.gpus[2]
    assert (first.name, first.uuid, first.pci_bus_id) == ("AMD Instinct MI300X", MI300X[0]["uuid"], "0000:0c:00.0")
    assert (first.total_bytes, first.used_bytes, first.free_bytes) == (192 * 10**9, 3 * 2**30, 192 * 10**9 - 3 * 2**30)
    assert first.cuda_index is None and first.processes is None
    assert amdsmi.calls == ["init", "shutdown"]
    alone = query({}, NO_NVIDIA_DRIVER)  # type: ignore[arg-type]
    assert alone.unavailable is None and [gpu.vendor for gpu in alone.gpus] == ["AMD", "AMD"]


@pytest.mark.parametrize(("amdsmi", "sentence"), [
    (None, "NVML does not list AMD GPUs: install AMD SMI's Python package (amdsmi)"),  # None in sys.modules: not installed
    (fake_amdsmi(MI300X, AmdSmiException("AMDSMI_STATUS_DRIVER_NOT_LOADED")),
     "AMD SMI could not start: AMDSMI_STATUS_DRIVER_NOT_LOADED"),
    (fake_amdsmi([]), "AMD SMI sees no AMD GPU"),
])
def test_without_any_gpu_one_sentence_says_why_for_nvml_and_for_amd(monkeypatch: pytest.MonkeyPatch, amdsmi: Any,
                                                                      sentence: str) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", amdsmi)
    monkeypatch.setattr(nvml, "torch_hip_version", lambda: None)
    why = query({}, NO_NVIDIA_DRIVER).unavailable  # type: ignore[arg-type]
    assert why is not None and "\n" not in why and why.startswith("no NVIDIA driver here") and sentence in why
    assert "ROCm" not in why
    monkeypatch.setattr(nvml, "torch_hip_version", lambda: "6.4.43482")
    on_rocm = query({}, NO_NVIDIA_DRIVER).unavailable  # type: ignore[arg-type]
    assert on_rocm is not None and "; torch here is a ROCm build (HIP 6.4.43482) and NVML does not list AMD GPUs: " in on_rocm


def test_an_nvidia_list_needs_no_amd_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    report = query({}, fake_nvml(TWO_H100))  # type: ignore[arg-type]
    assert report.unavailable is None and [gpu.vendor for gpu in report.gpus] == ["NVIDIA", "NVIDIA"]


def test_gpus_table_and_json_with_amd_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(MI300X))
    table = _run_cli(monkeypatch, fake_nvml(TWO_H100))
    assert table.exit_code == 0, table.output
    assert "NVIDIA driver 560.35.03" in table.output and "AMD driver 6.10.5" in table.output
    assert "AMD Instinct MI300X" in table.output and "MI300X-192GB" in table.output and "3 GiB / 179 GiB" in table.output
    assert "not known for AMD GPUs" in table.output
    rows = json.loads(_run_cli(monkeypatch, fake_nvml(TWO_H100), "--json").output)
    assert [(row["vendor"], row["index"]) for row in rows] == [("NVIDIA", 0), ("NVIDIA", 1), ("AMD", 0), ("AMD", 1)]
    amd_only = _run_cli(monkeypatch, NO_NVIDIA_DRIVER)
    assert "AMD driver 6.10.5" in amd_only.output and "NVIDIA driver" not in amd_only.output
