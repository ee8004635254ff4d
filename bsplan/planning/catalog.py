"""A catalogue of common training GPUs, so `bsplan estimate` and `bsplan plan` can size a job for a
GPU you do not have. Pure data and string matching: no torch, no NVML.

Every number has a source in docs/gpus.md. `memory_bytes` is the total that NVML (nvidia-smi,
`bsplan gpus`) reports for the card, which varies by a few hundred MiB between driver versions;
`bf16_tflops` is the dense (not 2:4 sparse) bf16 tensor-core peak, None where the GPU has no
bf16 tensor cores; `nvlink_gb_per_s` is the datasheet's NVLink bandwidth per GPU, both directions
together (a collective sends at half of it), None where the card has none or bsplan has no source.
AMD's cards are not seen by NVML: their `name` is the one ROCm gives (torch.cuda.get_device_name on a
ROCm build of torch), their memory the datasheet's GB read as decimal (rocm-smi reports up to 7% more).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from bsplan.planning.errors import BadInput
from bsplan.planning.record import Record

MIB = 2**20
GB = 10**9


@dataclass(frozen=True)
class GpuModel(Record):
    key: str  # what `--gpu` prints and matches first, e.g. "H100-SXM-80GB"
    name: str  # as NVML names the device, e.g. "NVIDIA H100 80GB HBM3"
    memory_bytes: int
    bf16_tflops: float | None
    bandwidth_gb_per_s: float
    compute_capability: tuple[int, int]  # picks PyTorch's default cuBLAS workspace (memory_line.py)
    note: str = ""
    nvlink_gb_per_s: float | None = None  # `bsplan routes` turns the bytes a strategy moves into seconds with it


CATALOG: tuple[GpuModel, ...] = (
    GpuModel("V100-SXM2-16GB", "Tesla V100-SXM2-16GB", 16160 * MIB, None, 900, (7, 0), "no bf16; fp16 tensor 125 TFLOP/s"),
    GpuModel("V100-PCIE-32GB", "Tesla V100-PCIE-32GB", 32480 * MIB, None, 900, (7, 0), "no bf16; fp16 tensor 112 TFLOP/s"),
    GpuModel("T4-16GB", "Tesla T4", 15360 * MIB, None, 320, (7, 5), "no bf16; fp16 tensor 65 TFLOP/s"),
    GpuModel("A10G-24GB", "NVIDIA A10G", 23028 * MIB, 70, 600, (8, 6), "AWS G5; the A10 has 125 bf16 TFLOP/s"),
    GpuModel("L4-24GB", "NVIDIA L4", 23034 * MIB, 121, 300, (8, 9)),
    GpuModel("L40S-48GB", "NVIDIA L40S", 46068 * MIB, 362, 864, (8, 9)),
    GpuModel("A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB", 40960 * MIB, 312, 1555, (8, 0), nvlink_gb_per_s=600),
    GpuModel("A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", 81920 * MIB, 312, 2039, (8, 0), nvlink_gb_per_s=600),
    GpuModel("H100-SXM-80GB", "NVIDIA H100 80GB HBM3", 81559 * MIB, 989, 3350, (9, 0), nvlink_gb_per_s=900),
    GpuModel("H100-PCIE-80GB", "NVIDIA H100 PCIe", 81559 * MIB, 756, 2000, (9, 0)),
    GpuModel("H200-SXM-141GB", "NVIDIA H200", 143771 * MIB, 989, 4800, (9, 0), nvlink_gb_per_s=900),
    GpuModel("RTX-3090-24GB", "NVIDIA GeForce RTX 3090", 24576 * MIB, 71, 936, (8, 6), "bf16 with fp32 accumulate"),
    GpuModel("RTX-4090-24GB", "NVIDIA GeForce RTX 4090", 24564 * MIB, 165, 1008, (8, 9), "bf16 with fp32 accumulate"),
    GpuModel("RTX-A6000-48GB", "NVIDIA RTX A6000", 49140 * MIB, 155, 768, (8, 6)),
    GpuModel("H20-96GB", "NVIDIA H20", 97871 * MIB, 148, 4000, (9, 0), "China export part; no public NVIDIA datasheet",
             nvlink_gb_per_s=900),
    GpuModel("H200-NVL-141GB", "NVIDIA H200 NVL", 143771 * MIB, 835.5, 4800, (9, 0), "PCIe; NVLink bridge of 2 or 4",
             nvlink_gb_per_s=900),
    GpuModel("B200-180GB", "NVIDIA B200", 183359 * MIB, 2250, 7700, (10, 0), nvlink_gb_per_s=1800),
    GpuModel("GB200-186GB", "NVIDIA GB200", 189471 * MIB, 2500, 8000, (10, 0), "one GPU of a Grace Blackwell superchip",
             nvlink_gb_per_s=1800),
    GpuModel("B300-288GB", "NVIDIA B300 SXM6 AC", 275040 * MIB, 2250, 8000, (10, 3), "Blackwell Ultra (HGX B300)",
             nvlink_gb_per_s=1800),
    GpuModel("RTX-5090-32GB", "NVIDIA GeForce RTX 5090", 32607 * MIB, 209.5, 1792, (12, 0), "bf16 with fp32 accumulate"),
    GpuModel("RTX-PRO-6000-96GB", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 97887 * MIB, 503.8, 1792, (12, 0),
             "also Max-Q and Server Edition"),
    GpuModel("MI300X-192GB", "AMD Instinct MI300X", 192 * GB, 1307.4, 5300, (9, 4), "ROCm, gfx942"),
    GpuModel("MI325X-256GB", "AMD Instinct MI325X", 256 * GB, 1307.4, 6000, (9, 4), "ROCm, gfx942"),
    GpuModel("MI355X-288GB", "AMD Instinct MI355X", 288 * GB, 2500, 8000, (9, 5), "ROCm, gfx950"),
)


def _tokens(text: str) -> set[str]:
    """Case, separators and letter/digit boundaries dropped: "H100-80GB" -> {h, 100, 80, gb}."""
    return set(re.findall(r"[a-z]+|\d+", text.lower()))


def find_gpu(text: str) -> GpuModel:
    """The catalogue entry a loose name means: every word of the name must appear in the entry's
    key or NVML name ("h100", "H100-80GB", "rtx4090", "NVIDIA A10G"). A name that fits several
    entries with the same memory (h100: SXM and PCIe, both 80 GB) takes the first listed, since
    memory is what an estimate depends on; several with different memory (a100: 40 or 80 GB) is
    refused with the choices."""
    wanted = _tokens(text)
    matches = [gpu for gpu in CATALOG if wanted and wanted <= _tokens(gpu.key) | _tokens(gpu.name)]
    if len({gpu.memory_bytes for gpu in matches}) > 1:  # "gb200": its "gb" is a key's unit too; the name as written decides
        whole = re.sub(r"[^a-z0-9]", "", text.lower())
        matches = [gpu for gpu in matches if whole in re.sub(r"[^a-z0-9]", "", f"{gpu.key} {gpu.name}".lower())] or matches
    if matches and len({gpu.memory_bytes for gpu in matches}) == 1:
        return matches[0]
    if matches:
        raise BadInput(f"--gpu {text!r} fits several GPUs with different memory: {', '.join(g.key for g in matches)}; name one")
    raise BadInput(f"--gpu {text!r} is not in the catalogue{_close_to(text, wanted)}; `bsplan gpus --catalog` lists the catalogue, or give --memory SIZE")


def match_nvml_name(name: str) -> GpuModel | None:
    """The catalogue entry of a device NVML reports, by its exact name."""
    return next((gpu for gpu in CATALOG if gpu.name == name), None)


def _close_to(text: str, wanted: set[str]) -> str:
    sharing = [gpu.key for gpu in CATALOG if wanted & (_tokens(gpu.key) - {"gb"})]
    similar = difflib.get_close_matches(text.upper(), [gpu.key for gpu in CATALOG], n=3, cutoff=0.5)
    close = list(dict.fromkeys(similar + sharing))[:4]
    return f" (close: {', '.join(close)})" if close else ""
