"""CudaDevice driven by a fake `torch.cuda`: reading peak and total memory, resetting counters,
emptying the cache and refusing past a limit, with no GPU. The fake's counters are a real
TensorBytesLimit, so trials on the CPU measure what CUDA's allocator would count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import EXAMPLES, MODELS

from bsplan.backends.cpu import TensorBytesLimit
from bsplan.backends.cuda import CudaDevice
from bsplan.backends.device import open_device
from bsplan.measure import probe as probe_module
from bsplan.measure import sources
from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import run_probe
from bsplan.planning.errors import BadInput

GIB = 2**30


class FakeCuda:
    """The slice of torch.cuda that CudaDevice uses, backed by a byte counter."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.counter = TensorBytesLimit(total)
        self.calls: list[str] = []

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=self.total)

    def set_per_process_memory_fraction(self, fraction: float, index: int) -> None:
        self.counter.limit_bytes = int(fraction * self.total)

    def reset_peak_memory_stats(self, index: int) -> None:
        self.calls.append("reset")
        self.counter.reset_peak()

    def max_memory_allocated(self, index: int) -> int:
        return self.counter.peak_bytes

    def memory_allocated(self, index: int) -> int:
        return self.counter.current_bytes

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")

    def synchronize(self, index: int) -> None:
        self.calls.append("synchronize")


def test_cuda_device_reads_name_total_and_counters() -> None:
    cuda = FakeCuda(80 * GIB)
    device = CudaDevice(0, None, cuda)
    assert device.info.name == "cuda:0 (NVIDIA H100 80GB HBM3)"
    assert (device.info.total_bytes, device.info.limit_source, device.info.exact) == (80 * GIB, "device", True)
    with cuda.counter:
        kept = torch.zeros(1024)
        device.reset_peak()
        torch.zeros(2048)
        assert device.current_bytes() == kept.nbytes
        assert device.peak_bytes() == kept.nbytes + 8192
    device.release()
    assert cuda.calls[-2:] == ["synchronize", "empty_cache"]


def test_cuda_memory_limit_sets_the_allocator_fraction() -> None:
    cuda = FakeCuda(80 * GIB)
    device = CudaDevice(0, 8 * GIB, cuda)
    assert (device.info.total_bytes, device.info.limit_source) == (8 * GIB, "--memory-limit")
    assert cuda.counter.limit_bytes == 8 * GIB


def _probe_on_fake_cuda(monkeypatch: pytest.MonkeyPatch, model: str, total: int, options: ProbeOptions):
    cuda = FakeCuda(total)
    device = CudaDevice(0, options.memory_limit, cuda)
    device.torch_device = torch.device("cpu")  # tensors live on the CPU; the counters are CUDA's
    monkeypatch.setattr(sources, "open_device", lambda spec, limit, count=True: device)
    progress = SimpleNamespace(started=lambda batch: None, finished=lambda trial: None, note=lambda text: None)
    with cuda.counter:
        return run_probe(model, options, progress), cuda


def test_probe_on_a_cuda_device_uses_the_allocator_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    result, cuda = _probe_on_fake_cuda(monkeypatch, EXAMPLES / "cnn.py", 64 * 2**20, ProbeOptions())
    assert result.device.type == "cuda" and result.max_batch == 24 and result.first_oom_batch == 25
    assert cuda.calls.count("reset") >= len(result.trials)  # before each trial, and before its last step
    assert cuda.calls.count("empty_cache") >= len(result.trials)


def test_a_cuda_out_of_memory_message_fails_the_trial_not_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OOM_BATCH", "21")
    result, _ = _probe_on_fake_cuda(monkeypatch, MODELS / "fake_oom.py", 80 * GIB, ProbeOptions(max_batch=1000))
    assert (result.max_batch, result.first_oom_batch) == (20, 21)
    assert "CUDA out of memory" in next(t.error for t in result.trials if not t.fits)


def test_open_device_refuses_unknown_and_missing_devices() -> None:
    with pytest.raises(BadInput, match="unknown device"):
        open_device("tpu", None)
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="CUDA is not available"):
            open_device("cuda:0", None)
    assert open_device("cpu", 2**20).info.total_bytes == 2**20


def test_an_address_space_limit_below_the_memory_limit_is_named_so_the_probe_restarts_after_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bsplan.backends import cpu as devices
    from bsplan.backends.host import HostLimit

    limits = [HostLimit("MemAvailable", 16 * 2**30), HostLimit("RLIMIT_DATA", 2**30)]
    monkeypatch.setattr(devices, "host_limits", lambda: limits)
    above = devices.CpuDevice(8 * 2**30)  # --memory-limit 8GiB: the rlimit bites first
    assert (above.outside_limit, above.info.limit_source, above.info.exact) == ("RLIMIT_DATA", "--memory-limit", False)
    below = devices.CpuDevice(512 * 2**20)  # --memory-limit 512MiB: exact, in one process
    assert (below.outside_limit, below.info.exact) == (None, True)


    class ChoseTheWorld(Exception):
        pass

    def world(*_: object) -> None:
        raise ChoseTheWorld

    monkeypatch.setattr(probe_module, "World", world)
    with pytest.raises(ChoseTheWorld):  # trials in a child process, restarted after each failure
        run_probe(MODELS / "tiny.py", ProbeOptions(device="cpu", memory_limit=8 * 2**30), SimpleNamespace())


def test_without_a_memory_limit_the_cpu_keeps_a_reserve_of_the_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # Aimed at all of MemAvailable, a probe's first jump left the kernel reclaiming the pages of
    # running code: it hung for minutes. The reserve leaves them room.
    from bsplan.backends import cpu as devices
    from bsplan.backends.host import HostLimit

    monkeypatch.setattr(devices, "host_limits", lambda: [HostLimit("MemAvailable", 16 * 2**30)])
    cpu = devices.CpuDevice(None)
    assert cpu.info.total_bytes == 16 * 2**30 - (int(1.6 * 2**30) + 2**30)
    assert (cpu.info.limit_source, cpu.info.exact) == ("MemAvailable", True)
    assert any("less 2.6 GiB kept for the OS" in note for note in cpu.notes)
    assert devices.CpuDevice(2**30).info.total_bytes == 2**30  # a --memory-limit is taken as given


def test_the_template_starts_before_torch_only_where_trials_will_run_in_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from bsplan.backends.host import HostLimit
    from bsplan.measure import template
    from bsplan.measure.options import ProbeOptions

    started: list[bool] = []
    monkeypatch.setattr(template.forkserver, "ensure_running", lambda: started.append(True))
    monkeypatch.setattr(template, "host_limits", lambda: [HostLimit("MemAvailable", 2**34), HostLimit("RLIMIT_DATA", 2**28)])
    for options, expected in [
        (ProbeOptions(device="cpu"), True),  # the rlimit sets the edge: a fresh process per trial
        (ProbeOptions(device="cpu", memory_limit=2**27), False),  # --memory-limit bites first: one process
        (ProbeOptions(device="cuda:0"), False),
        (ProbeOptions(device="cpu", memory_limit=2**27, strategy="ddp", nproc=2), True),  # ranks
    ]:
        started.clear()
        template.start_early(options)
        assert started == ([True] if expected else []), options
