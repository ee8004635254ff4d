"""The CPU's exact limit: live tensor bytes counted once, freed on release, refused past the limit."""

import gc

import pytest
import torch

from bsplan.cpumem import TensorBytesLimit, host_limits


def test_counts_each_storage_once_and_forgets_it_when_freed() -> None:
    counter = TensorBytesLimit(10 * 2**20)
    with counter:
        first = torch.zeros(1024)  # 4 KiB
        view = first[:10]
        view.add_(1)  # in place on a view: the same storage
        assert counter.current_bytes == 4096
        second = torch.ones(256, dtype=torch.float64)  # 2 KiB
        assert counter.current_bytes == 4096 + 2048
        del first, view
        gc.collect()
        assert counter.current_bytes == 2048
        assert counter.peak_bytes == 4096 + 2048
        counter.reset_peak()
        assert counter.peak_bytes == 2048
        del second


def test_refuses_an_allocation_past_the_limit_as_out_of_memory_and_recovers() -> None:
    counter = TensorBytesLimit(1 * 2**20)
    with counter:
        kept = torch.zeros(128 * 1024)  # 512 KiB
        with pytest.raises(torch.OutOfMemoryError, match="DefaultCPUAllocator: can.t allocate memory"):
            torch.zeros(200 * 1024)  # 800 KiB more
        gc.collect()
        assert counter.current_bytes == kept.nbytes
        assert counter.peak_bytes == kept.nbytes  # the refused allocation never counts as the peak
        torch.zeros(100 * 1024)  # what fits still fits


def test_backward_allocations_are_counted() -> None:
    counter = TensorBytesLimit(2**30)
    with counter:
        layer = torch.nn.Linear(256, 256)
        static = counter.current_bytes
        layer(torch.randn(64, 256)).sum().backward()
        gradients = sum(p.grad.nbytes for p in layer.parameters())
        assert counter.current_bytes == static + gradients
        assert counter.peak_bytes > static + gradients


def test_host_limits_report_available_memory() -> None:
    sources = {limit.source: limit.remaining_bytes for limit in host_limits()}
    assert sources["MemAvailable"] > 0
