"""`bsplan probe --nproc 2` over gloo on the CPU: per-device memory under DDP and FSDP, exact
against fresh 2-process checks, and never hanging when only one rank runs out of memory."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, MODELS, bsplan

from bsplan.measure import world as distributed
from bsplan.measure.options import ProbeOptions
from bsplan.planning.errors import BsplanError

MIB = 2**20

pytestmark = pytest.mark.slow


def _probe(model: Path, *extra: str, cwd: Path, env: dict[str, str] | None = None):
    return bsplan("probe", str(model), "--device", "cpu", "--nproc", "2", "--json", "--no-save", *extra, cwd=cwd, env=env)


def test_ddp_max_batch_is_confirmed_by_a_fresh_two_process_check(workdir: Path) -> None:
    common = ("--memory-limit", "64MiB", "--strategy", "ddp")
    run = _probe(EXAMPLES / "cnn.py", *common, cwd=workdir)
    assert run.code == 0, run.stderr
    result = run.json()
    assert (result["world_size"], result["strategy"]) == (2, "ddp")
    largest = result["max_batch"]
    memory = result["breakdown"]
    assert memory["bucket_bytes"] == pytest.approx(memory["gradient_bytes"], rel=0.01)  # DDP's copy of the gradients
    alone = _probe(EXAMPLES / "cnn.py", *common, "--min-batch", str(largest), "--max-batch", str(largest), cwd=workdir)
    assert alone.code == 0 and alone.json()["max_batch"] == largest
    above = _probe(EXAMPLES / "cnn.py", *common, "--min-batch", str(largest + 1), "--max-batch", str(largest + 1), cwd=workdir)
    assert above.code == 3 and above.json()["max_batch"] is None


def test_a_fresh_world_takes_an_ambiguous_error_as_out_of_memory_on_the_earlier_worlds_evidence(workdir: Path) -> None:
    # Batches above 8 raise oneDNN's ambiguous message. After the first failure the world restarts,
    # and its ranks have run nothing yet: the evidence (batch 8 fitted) comes from the parent.
    run = _probe(MODELS / "ambiguous.py", "--strategy", "ddp", "--memory-limit", "64MiB", "--max-batch", "16",
                 cwd=workdir, env={"AMBIGUOUS_LIMIT": "8"})
    assert run.code == 0, run.stderr
    result = run.json()
    assert (result["max_batch"], result["first_oom_batch"]) == (8, 9)
    failed = [trial for trial in result["trials"] if not trial["fits"]]
    assert len(failed) >= 2 and all("batch 8 fitted" in trial["oom_evidence"] for trial in failed)


def test_bucket_view_drops_the_second_copy_of_the_gradients(workdir: Path) -> None:
    runs = {
        flag: _probe(EXAMPLES / "mlp.py", "--memory-limit", "64MiB", "--min-batch", "64", "--max-batch", "64", *flag, cwd=workdir).json()
        for flag in ((), ("--bucket-view",))
    }
    default, view = runs[()], runs[("--bucket-view",)]
    gradients = default["breakdown"]["gradient_bytes"]
    assert default["breakdown"]["bucket_bytes"] == pytest.approx(gradients, rel=0.01)
    assert view["breakdown"]["bucket_bytes"] < gradients / 2
    assert default["peak_bytes"] - view["peak_bytes"] == pytest.approx(gradients, rel=0.1)


def test_fsdp_shards_the_static_memory(workdir: Path) -> None:
    run = _probe(EXAMPLES / "mlp.py", "--strategy", "fsdp", "--memory-limit", "64MiB", "--min-batch", "64", "--max-batch", "64", cwd=workdir)
    assert run.code == 0, run.stderr
    result = run.json()
    one = bsplan("probe", str(EXAMPLES / "mlp.py"), "--device", "cpu", "--memory-limit", "64MiB", "--min-batch", "64",
                 "--max-batch", "64", "--json", "--no-save", cwd=workdir).json()
    assert result["strategy"] == "fsdp"
    assert result["breakdown"]["parameter_bytes"] == pytest.approx(one["breakdown"]["parameter_bytes"] / 2, rel=0.01)
    assert result["breakdown"]["optimizer_state_bytes"] == pytest.approx(one["breakdown"]["optimizer_state_bytes"] / 2, rel=0.01)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_one_rank_out_of_memory_never_hangs_the_other(workdir: Path, where: str) -> None:
    """Rank 1 fails from batch 10 on; in the backward, rank 0 is left waiting in DDP's all-reduce."""
    start = time.monotonic()
    run = _probe(MODELS / "rank_oom.py", "--memory-limit", "64MiB", "--max-batch", "16", "--timeout", "60", cwd=workdir,
                 env={"RANK_OOM_BATCH": "10", "RANK_OOM_WHERE": where})
    assert run.code == 0, run.stderr
    result = run.json()
    assert (result["max_batch"], result["first_oom_batch"]) == (9, 10)
    failed = [trial for trial in result["trials"] if not trial["fits"]]
    assert failed and all(trial["error"].startswith("rank 1: CUDA out of memory") for trial in failed)
    assert time.monotonic() - start < 60  # never waited for a timeout


def test_one_rank_failing_every_batch_reports_no_fit(workdir: Path) -> None:
    run = _probe(MODELS / "rank_oom.py", "--memory-limit", "64MiB", "--max-batch", "16", "--timeout", "60", cwd=workdir,
                 env={"RANK_OOM_BATCH": "1"})
    assert run.code == 3
    assert run.json()["max_batch"] is None and run.json()["world_size"] == 2


def test_a_rank_that_never_answers_ends_at_the_timeout(workdir: Path) -> None:
    start = time.monotonic()
    run = _probe(MODELS / "rank_hang.py", "--memory-limit", "64MiB", "--timeout", "8", cwd=workdir)
    assert run.code == 1
    assert "no rank answered within 8 s" in run.json()["error"]
    assert time.monotonic() - start < 60


def test_strategy_options_are_checked(workdir: Path) -> None:
    run = bsplan("probe", str(MODELS / "tiny.py"), "--device", "cpu", "--strategy", "fsdp", "--bucket-view", "--json", cwd=workdir)
    assert run.code == 2 and "--bucket-view" in run.json()["error"]
    run = bsplan("probe", str(MODELS / "tiny.py"), "--device", "cpu", "--nproc", "0", "--json", cwd=workdir)
    assert run.code == 2 and "--nproc" in run.json()["error"]


def test_a_trial_process_the_out_of_memory_killer_ends_fails_its_trial_and_the_next_starts_afresh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("KILLED_BATCH", "10")
    monkeypatch.setenv("SCORE_FILE", str(tmp_path / "scores"))
    kills = itertools.count()
    monkeypatch.setattr(distributed, "oom_kills", lambda: next(kills))  # rises at every reading, as after a kill
    with distributed.World(MODELS / "killed.py", ProbeOptions(device="cpu", memory_limit=64 * MIB), "a cgroup's limit") as world:
        assert world(9).fits
        killed = world(10)
        assert not killed.fits and killed.error.startswith("killed by the kernel's out-of-memory killer")
        assert "oom_kill" in killed.oom_evidence
        assert world(9).fits  # a fresh process
        assert any(note.startswith("a cgroup's limit: each trial ran in a fresh process") for note in world.notes)
    # Each trial process (one a trial) offers itself first to the killer: the parent, which reports, survives.
    assert (tmp_path / "scores").read_text().split() == ["1000", "1000", "1000"]


def test_a_trial_process_killed_by_anything_else_stops_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILLED_BATCH", "10")
    monkeypatch.setattr(distributed, "oom_kills", lambda: 0)  # no out-of-memory kill: a kill -9 from somebody
    with distributed.World(MODELS / "killed.py", ProbeOptions(device="cpu", memory_limit=64 * MIB), "a cgroup's limit") as world:
        with pytest.raises(BsplanError, match="the trial process ended with exit code -9"):
            world(10)


@pytest.mark.parametrize("peer_error", ["", "1"])
def test_a_rank_the_out_of_memory_killer_ends_fails_the_trial_on_every_rank(monkeypatch: pytest.MonkeyPatch, peer_error: str) -> None:
    # Rank 0 goes on into DDP's all-reduce, which fails (or waits) without its peer: the trial failed
    # for rank 1's memory, whether the parent hears of the death first or of rank 0's error.
    monkeypatch.setenv("PEER_ERROR", peer_error)
    monkeypatch.setenv("KILLED_BATCH", "10")
    monkeypatch.setenv("KILLED_RANK", "1")
    kills = itertools.count()
    monkeypatch.setattr(distributed, "oom_kills", lambda: next(kills))
    options = ProbeOptions(device="cpu", memory_limit=64 * MIB, nproc=2, strategy="ddp", timeout=60)
    with distributed.World(MODELS / "killed.py", options) as world:
        assert world(9).fits
        killed = world(10)
        assert not killed.fits and killed.error.startswith("rank 1: killed by the kernel's out-of-memory killer")
        assert world(9).fits
