"""The CPU's exact limit: live tensor bytes counted once, freed on release, refused past the limit."""

import gc
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bsplan.backends.cpu import TensorBytesLimit
from bsplan.backends.host import HostLimit, _cgroup_remaining, host_limits, oom_kills

GIB = 2**30


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


def _cgroup_tree(root: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc/self/cgroup and /sys/fs/cgroup: `files` maps paths under the mount to contents."""
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "cgroup").write_text(membership)
    for name, text in files.items():
        (root / "mount" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "mount" / name).write_text(text)
    return root / "proc" / "cgroup", root / "mount"


def test_a_cgroup_v2_limit_on_an_ancestor_applies_less_its_working_set(tmp_path: Path) -> None:
    # A Slurm job: the limit on the job, the process in a step below it, no limit on the step.
    membership, mount = _cgroup_tree(tmp_path, "0::/slurm/job_7/step_0\n", {
        "slurm/job_7/memory.max": str(3 * GIB), "slurm/job_7/memory.current": str(2 * GIB),
        "slurm/job_7/memory.stat": f"anon 1000\ninactive_file {GIB // 2}\n",
        "slurm/job_7/step_0/memory.max": "max", "slurm/job_7/step_0/memory.current": str(GIB),
        "memory.current": str(10 * GIB),  # the root has no limit file
    })
    assert _cgroup_remaining(membership, mount) == HostLimit(
        "cgroup memory.max", 3 * GIB - (2 * GIB - GIB // 2), mount / "slurm/job_7/memory.current")


def test_the_tightest_of_a_cgroup_v1_and_its_ancestors_applies(tmp_path: Path) -> None:
    membership, mount = _cgroup_tree(tmp_path, "5:cpu,cpuacct:/other\n4:memory:/batch/job\n0::/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": str(GIB),
        "memory/batch/memory.limit_in_bytes": str(4 * GIB), "memory/batch/memory.usage_in_bytes": str(GIB),
        "memory/batch/job/memory.limit_in_bytes": str(2 * GIB), "memory/batch/job/memory.usage_in_bytes": str(GIB),
        "memory/batch/job/memory.stat": f"inactive_file 5\ntotal_inactive_file {GIB // 4}\n",
    })
    assert _cgroup_remaining(membership, mount) == HostLimit(
        "cgroup memory limit", 2 * GIB - (GIB - GIB // 4), mount / "memory/batch/job/memory.usage_in_bytes")


def test_a_container_sees_its_limit_at_the_root_and_no_limit_is_none(tmp_path: Path) -> None:
    membership, mount = _cgroup_tree(tmp_path / "a", "0::/\n", {"memory.max": str(GIB), "memory.current": str(GIB // 4)})
    assert _cgroup_remaining(membership, mount) == HostLimit("cgroup memory.max", GIB - GIB // 4, mount / "memory.current")
    membership, mount = _cgroup_tree(tmp_path / "b", "0::/user.slice\n", {
        "user.slice/memory.max": "max", "user.slice/memory.current": str(GIB)})
    assert _cgroup_remaining(membership, mount) is None


def test_oom_kills_counts_this_cgroups_kills_not_the_hosts(tmp_path: Path) -> None:
    # Another job's kill on a shared node raises the host's count (/proc/vmstat), not this cgroup's.
    (tmp_path / "vmstat").write_text("pgfault 12\noom_kill 30\n")
    vmstat = tmp_path / "vmstat"
    membership, mount = _cgroup_tree(tmp_path / "v2", "0::/job\n", {"job/memory.events": "low 0\noom 2\noom_kill 2\n"})
    assert oom_kills(membership, mount, vmstat) == 2
    membership, mount = _cgroup_tree(tmp_path / "v1", "4:memory:/job\n0::/\n", {
        "memory/job/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"})
    assert oom_kills(membership, mount, vmstat) == 1
    membership, mount = _cgroup_tree(tmp_path / "none", "0::/\n", {})
    assert oom_kills(membership, mount, vmstat) == 30
    assert oom_kills(membership, mount, tmp_path / "missing") is None


def test_a_cgroup_outside_the_namespace_and_a_malformed_limit_are_passed_over(tmp_path: Path) -> None:
    membership, mount = _cgroup_tree(tmp_path, "0::/../elsewhere\n", {
        "memory.max": str(GIB), "memory.current": str(GIB // 2), "../elsewhere/memory.max": "1", "../elsewhere/memory.current": "0",
    })
    assert _cgroup_remaining(membership, mount) == HostLimit("cgroup memory.max", GIB // 2, mount / "memory.current")
    (mount / "memory.max").write_text("")
    assert _cgroup_remaining(membership, mount) is None


def test_a_meter_is_read_after_every_operator_and_its_peak_kept() -> None:
    """Under a limit from outside the process the counter also keeps the peak of what that limit
    counts, read after each operator (the search aims with it)."""
    readings: list[int] = []

    def meter() -> int:
        readings.append(len(readings))
        return [5, 9, 7, 3][len(readings) % 4]

    counter = TensorBytesLimit(2**30, meter)
    with counter:
        x = torch.ones(1000)
        y = x * 2 + 1  # two operators
        del x, y
    assert len(readings) >= 3 and counter.meter_peak_bytes == 9
    counter.reset_peak()  # the peak starts again from the meter's reading now
    assert counter.meter_peak_bytes in (3, 5, 7, 9) and TensorBytesLimit(2**30).meter_peak_bytes == 0


def test_the_usage_meter_reads_what_rlimit_data_counts() -> None:
    from bsplan.backends.host import UsageMeter, _read_counters

    def vmdata() -> int:
        return _read_counters(Path("/proc/self/status"))["VmData"]

    meter = UsageMeter(HostLimit("RLIMIT_DATA", 0))
    before = vmdata()
    block = bytearray(64 * 2**20)  # private, writable: what RLIMIT_DATA counts
    grown = vmdata() - before
    assert grown >= 64 * 2**20 and abs(meter() - grown) <= 2**20
    del block


def test_the_meters_peak_catches_an_allocation_freed_between_reads() -> None:
    """Where nothing counts tensors (the trial process under an outside limit), the peak comes from
    the meter alone: a thread's samples for RLIMIT_DATA, the kernel's VmPeak for RLIMIT_AS (read in a
    fresh process, whose VmPeak starts at its VmSize)."""
    from bsplan.backends.host import UsageMeter

    meter = UsageMeter(HostLimit("RLIMIT_DATA", 0))
    meter.sample()
    block = bytearray(64 * 2**20)
    time.sleep(0.05)
    del block
    assert meter() < 16 * 2**20 <= 64 * 2**20 <= meter.peak()
    code = ("from bsplan.backends.host import HostLimit, UsageMeter\n"
            "meter = UsageMeter(HostLimit('RLIMIT_AS', 0))\n"
            "block = bytearray(64 * 2**20); del block\n"
            "print(meter(), meter.peak())")
    now, peak = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert now < 16 * 2**20 <= 64 * 2**20 <= peak
