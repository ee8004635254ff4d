"""Is this exception an out-of-memory? One place decides, by type and message (docs/probe.md)."""

from __future__ import annotations

from enum import Enum

import torch

# Messages that only an exhausted allocator produces. Sources: PyTorch's c10/cuda/CUDACachingAllocator.cpp
# ("CUDA out of memory"), c10/core/impl/alloc_cpu.cpp ("DefaultCPUAllocator: can't allocate memory"),
# cuBLAS/cuDNN status names, and Lightning's utilities/memory.py is_oom_error.
_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUFFT_ALLOC_FAILED",
)
# Messages that exhaustion produces but other faults do too: oneDNN reports a failed scratch
# allocation as "could not create a primitive" (seen under a process memory limit), and cuDNN
# answers NOT_SUPPORTED when it cannot get its workspace. These are out-of-memory only with
# evidence (a smaller batch fitted); see TrialRunner.
_AMBIGUOUS_MESSAGES = (
    "could not create a primitive",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "CUDNN_STATUS_INTERNAL_ERROR",
    "CUDNN_STATUS_EXECUTION_FAILED",
)


class Failure(Enum):
    OOM = "oom"
    AMBIGUOUS = "ambiguous"  # out-of-memory or a real fault: decided with evidence
    OTHER = "other"  # the user's error


def classify(error: BaseException) -> Failure:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return Failure.OOM
    if not isinstance(error, RuntimeError):
        return Failure.OTHER
    message = str(error)
    lowered = message.lower()
    if any(text.lower() in lowered for text in _OOM_MESSAGES):
        return Failure.OOM
    if any(text in message for text in _AMBIGUOUS_MESSAGES):
        return Failure.AMBIGUOUS
    return Failure.OTHER
