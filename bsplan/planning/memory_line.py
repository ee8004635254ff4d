"""The memory line and what a CUDA device adds to it, as plain arithmetic (no torch), shared by
`bsplan probe`, `bsplan estimate` and `bsplan plan`.

A training step's peak is close to affine in the batch (docs/probe.md): base + per-sample x b.
A CUDA device adds what PyTorch's allocated-bytes counters do not show, or what a CPU measurement
cannot contain: the driver's reservation and the CUDA context, cuBLAS workspaces, and the caching
allocator's partly used segments. docs/estimate.md gives the source of every constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from bsplan.planning.record import Record

MIB = 2**20
GIB = 2**30

# What the device reports but PyTorch's allocator never gets: the driver's reservation (nvidia-smi -q
# "Reserved"; CUDA's total is about 470-620 MiB below NVML's on the H100 and A100 sources in
# docs/gpus.md) plus the CUDA context (287 MB with lazy loading in PyTorch PR #86509, "around 400MB"
# per its maintainers), which grows as cuBLAS, cuDNN and PyTorch load kernels during training.
DEFAULT_CUDA_CONTEXT_BYTES = 1 * GIB
# aten/src/ATen/cuda/CublasHandlePool.cpp: one cuBLAS workspace per (handle, stream), through the
# caching allocator, ":4096:2:16:8" = 2 x 4 MiB + 8 x 16 KiB by default and 32 MiB on sm90 (Hopper);
# a separate cuBLASLt workspace of 1 MiB (CUBLASLT_WORKSPACE_SIZE default).
_CUBLAS_WORKSPACE = 2 * 4096 * 1024 + 8 * 16 * 1024
_CUBLAS_WORKSPACE_SM90 = 8 * 4096 * 1024
_CUBLASLT_WORKSPACE = 1 * MIB
# c10/cuda/CUDACachingAllocator.cpp: requests up to 1 MiB are packed in 2 MiB segments (kSmallBuffer),
# 1-10 MiB ones in 20 MiB segments (kLargeBuffer). At the peak at least the last segment of each
# pool is partly empty: reserved but not allocated.
ALLOCATOR_RESERVE_BYTES = 2 * MIB + 20 * MIB


@dataclass(frozen=True)
class MemoryLine:
    """Peak bytes of a step at batch b: base_bytes + per_sample_bytes x b."""

    base_bytes: float
    per_sample_bytes: float

    def peak(self, batch: int) -> float:
        return self.base_bytes + self.per_sample_bytes * batch

    def largest_within(self, budget_bytes: float) -> int:
        """The largest batch a rising line keeps within a budget (below 1 where none does)."""
        return math.floor((budget_bytes - self.base_bytes) / self.per_sample_bytes)


def fit_line(points: Sequence[tuple[int, float]]) -> MemoryLine | None:
    """Least-squares line of peak bytes over batch; None with fewer than two distinct batches."""
    if len({batch for batch, _ in points}) < 2:
        return None
    mean_b = sum(b for b, _ in points) / len(points)
    mean_p = sum(p for _, p in points) / len(points)
    slope = sum((b - mean_b) * (p - mean_p) for b, p in points) / sum((b - mean_b) ** 2 for b, _ in points)
    return MemoryLine(mean_p - slope * mean_b, slope)


def fit_top(points: Sequence[tuple[int, float]]) -> MemoryLine | None:
    """The line through the largest batches (half the largest and up): the peak is affine only
    once one phase of the step dominates. Measured on examples/mlp.py: below about 600 samples the
    optimizer step sets the peak (3.1 KB per sample), above it the activations (11.3 KB)."""
    if not points:
        return None
    top = max(batch for batch, _ in points)
    upper = [(b, p) for b, p in points if 2 * b >= top]
    # Batches closer together than a quarter of the largest make a noisy slope: then all points.
    spread = top - min(b for b, _ in upper)
    return fit_line(upper) if 4 * spread >= top else fit_line(points)


@dataclass(frozen=True)
class Overheads(Record):
    """Bytes a CUDA device takes beyond the step's own tensors (all zero for a CPU budget)."""

    cuda_context_bytes: int = 0
    cublas_workspace_bytes: int = 0
    allocator_reserve_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.cuda_context_bytes + self.cublas_workspace_bytes + self.allocator_reserve_bytes

    def document(self) -> dict[str, Any]:
        return {**super().document(), "total_bytes": self.total_bytes}


def cuda_overheads(
    compute_capability: tuple[int, int], *, train: bool, context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES,
    workspaces_measured: bool = False,
) -> Overheads:
    """The overheads of one training process on a CUDA device. A training step runs matmuls on two
    threads (the forward on the caller's, the backward on autograd's device thread), each with its
    own cuBLAS handle and so its own workspaces; inference uses one. A measurement made on a CUDA
    device already counted the workspaces (they go through the caching allocator)."""
    cublas = _CUBLAS_WORKSPACE_SM90 if compute_capability == (9, 0) else _CUBLAS_WORKSPACE
    workspaces = 0 if workspaces_measured else (2 if train else 1) * (cublas + _CUBLASLT_WORKSPACE)
    return Overheads(context_bytes, workspaces, ALLOCATOR_RESERVE_BYTES)


@dataclass(frozen=True)
class Prediction:
    max_batch: int | None  # None: not even batch 1 fits
    recommended_batch: int | None
    peak_bytes: int | None  # predicted allocated peak at max_batch (what torch.cuda.max_memory_allocated shows)
    capped: bool  # the peak does not grow with the batch, so max_batch is the cap


def round_recommended(batch: int) -> int:
    """A recommended batch rounded down to a multiple of 8 from 8 up: tensor cores and most kernels
    prefer multiples of 8 (probe, estimate and plan all recommend this way)."""
    return batch - batch % 8 if batch >= 8 else batch


def predict(line: MemoryLine, total_bytes: int, overheads: Overheads, headroom: float, cap: int) -> Prediction:
    """Largest batch whose peak plus overheads fits total_bytes, and the largest keeping `headroom`
    of it free, rounded down to a multiple of 8 from 8 up (as `bsplan probe` recommends)."""
    workspaces = overheads.cublas_workspace_bytes
    outside = overheads.cuda_context_bytes + overheads.allocator_reserve_bytes

    def largest(budget: float) -> int:
        room = budget - outside - workspaces
        if line.per_sample_bytes <= 0:
            return cap if room - line.base_bytes >= line.per_sample_bytes else 0
        return min(cap, max(0, line.largest_within(room)))

    most = largest(total_bytes)
    if most < 1:
        return Prediction(None, None, None, capped=False)
    recommended = round_recommended(largest((1 - headroom) * total_bytes))
    return Prediction(most, recommended or None, round(line.peak(most) + workspaces), capped=most == cap)
