"""Out-of-memory classification: each message kind against ordinary errors."""

import pytest
import torch

from bsplan.measure.oom import Failure, classify


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity)"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."),
        RuntimeError("HIP out of memory. Tried to allocate 1.00 GiB"),
        MemoryError(),
    ],
)
def test_out_of_memory_messages(error: BaseException) -> None:
    assert classify(error) is Failure.OOM


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("could not create a primitive"),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    ],
)
def test_ambiguous_messages_need_evidence(error: BaseException) -> None:
    assert classify(error) is Failure.AMBIGUOUS


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x17 and 16x4)"),
        RuntimeError("Expected all tensors to be on the same device"),
        ValueError("out of memory"),  # the words, but not an error the allocator raises
        KeyError("tokens"),
        TypeError("forward() missing 1 required positional argument"),
    ],
)
def test_ordinary_errors_are_the_users(error: BaseException) -> None:
    assert classify(error) is Failure.OTHER
