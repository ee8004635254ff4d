"""Trials: real training steps, out-of-memory handled and the memory put back, user errors kept theirs."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES, MODELS

from bsplan.backends.cpu import CpuDevice
from bsplan.measure.trial import TrialRunner
from bsplan.measure.workload import load_workload
from bsplan.planning.errors import UserCodeError


def _runner(model_file, limit: int, **options) -> tuple[TrialRunner, CpuDevice]:
    workload = load_workload(model_file)
    device = CpuDevice(limit)
    device.tracking().__enter__()
    model = workload.build_model()
    settings = {"steps": 3, "precision": "fp32", "mode": "train", **options}
    return TrialRunner(workload, model, device, **settings), device


def test_memory_after_an_out_of_memory_is_what_it_was_before() -> None:
    runner, device = _runner(EXAMPLES / "cnn.py", 64 * 2**20)
    try:
        before = device.current_bytes()
        assert not runner(200).fits  # before any optimizer state exists: nothing of it is kept
        assert device.current_bytes() == before
        assert runner(16).fits
        between_trials = device.current_bytes()  # the parameters and the optimizer state, kept
        assert between_trials - before == runner.optimizer_state_bytes
        for batch in (200, 64, 33, 25):
            assert not runner(batch).fits
            assert device.current_bytes() == between_trials
        again = runner(16)
        assert again.fits and again.peak_bytes == runner.trials[1].peak_bytes
        assert runner.leaked_bytes == 0
    finally:
        device.tracking().__exit__(None, None, None)


def test_a_trial_that_fails_after_creating_the_optimizer_state_keeps_none_of_it() -> None:
    runner, device = _runner(EXAMPLES / "mlp.py", 64 * 2**20)
    try:
        before = device.current_bytes()
        assert not runner(5400).fits  # its first step fits and creates the state; its second does not
        assert device.current_bytes() == before and runner.leaked_bytes == 0
        assert runner(64).fits and device.current_bytes() - before == runner.optimizer_state_bytes
    finally:
        device.tracking().__exit__(None, None, None)


def test_state_a_later_trial_began_goes_with_its_failure_and_state_a_later_trial_made_is_kept() -> None:
    # Adam's state for the large branch (8 MB) does not fit in 14 MiB beside its gradient: batch 32
    # runs out of memory halfway through making it. Kept half made, batch 24 would raise KeyError.
    runner, device = _runner(MODELS / "lazy_branch.py", 14 * 2**20)
    try:
        assert runner(8).fits
        between_trials = device.current_bytes()
        assert not runner(32).fits
        assert device.current_bytes() == between_trials and runner.leaked_bytes == 0
        assert not runner(24).fits and runner(8).fits  # an out-of-memory again, not the user's error
    finally:
        device.tracking().__exit__(None, None, None)
    runner, device = _runner(MODELS / "lazy_branch.py", 64 * 2**20)
    try:
        assert runner(8).fits and runner(32).fits  # the second trial makes the large branch's state
        between_trials = device.current_bytes()
        assert runner(24).fits and device.current_bytes() == between_trials and runner.leaked_bytes == 0
    finally:
        device.tracking().__exit__(None, None, None)


def test_once_the_optimizer_state_exists_a_batch_that_does_not_fit_fails_in_its_first_step(monkeypatch) -> None:
    runner, device = _runner(EXAMPLES / "mlp.py", 64 * 2**20)
    made: list[int] = []
    make_batch = runner.workload.module.make_batch
    monkeypatch.setattr(runner.workload.module, "make_batch", lambda size: made.append(size) or make_batch(size))
    try:
        assert runner(64).fits and made == [64] * 3
        assert not runner(5400).fits and made[3:] == [5400]  # without the state its first step fits
    finally:
        device.tracking().__exit__(None, None, None)


def test_optimizer_state_counts_in_the_peak() -> None:
    runner, device = _runner(EXAMPLES / "mlp.py", 2**30)
    try:
        with_state = runner(8).peak_bytes
        parameters = sum(p.numel() * 4 for p in runner.model.parameters())
        assert runner.optimizer_state_bytes == pytest.approx(2 * parameters, rel=0.01)  # AdamW: two moments
        # Parameters + gradients + both moments are all live after the first step.
        assert with_state >= 4 * parameters
    finally:
        device.tracking().__exit__(None, None, None)


def test_inference_mode_keeps_no_gradients_or_state() -> None:
    runner, device = _runner(EXAMPLES / "mlp.py", 2**30, mode="infer")
    try:
        trial = runner(8)
        parameters = sum(p.numel() * 4 for p in runner.model.parameters())
        assert trial.fits and trial.peak_bytes < 2 * parameters
        assert runner.optimizer_state_bytes is None
    finally:
        device.tracking().__exit__(None, None, None)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_run(precision: str) -> None:
    runner, device = _runner(EXAMPLES / "cnn.py", 2**30, precision=precision)
    try:
        assert runner(4).fits
    finally:
        device.tracking().__exit__(None, None, None)


def test_a_shape_mismatch_is_the_users_error_never_out_of_memory() -> None:
    runner, device = _runner(MODELS / "shape_error.py", 2**30)
    try:
        with pytest.raises(UserCodeError, match="RuntimeError: mat1 and mat2 shapes") as raised:
            runner(4)
        assert "shape_error.py" in raised.value.traceback_text
        assert "bsplan/measure/trial.py" not in raised.value.traceback_text
    finally:
        device.tracking().__exit__(None, None, None)


def test_an_ambiguous_error_is_out_of_memory_only_when_a_smaller_batch_fitted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIGUOUS_LIMIT", "8")
    runner, device = _runner(MODELS / "ambiguous.py", 2**30)
    try:
        assert runner(8).fits
        trial = runner(9)
        assert not trial.fits and "batch 8 fitted" in trial.oom_evidence
    finally:
        device.tracking().__exit__(None, None, None)
    runner, device = _runner(MODELS / "ambiguous.py", 2**30)
    try:
        with pytest.raises(UserCodeError, match="no smaller batch fitted"):
            runner(9)
    finally:
        device.tracking().__exit__(None, None, None)


def test_fp16_counts_the_optimizer_state_even_when_gradients_would_overflow() -> None:
    runner, device = _runner(MODELS / "fp16_overflow.py", 2**30, precision="fp16")
    try:
        assert runner(32).fits
        parameters = sum(p.numel() * 4 for p in runner.model.parameters())
        assert runner.optimizer_state_bytes == pytest.approx(2 * parameters, rel=0.01)  # the step was not skipped
    finally:
        device.tracking().__exit__(None, None, None)


@pytest.mark.parametrize(("optimizer", "states"), [
    ("torch.optim.AdamW(parameters)", 2), ("torch.optim.SGD(parameters, lr=0.1, momentum=0.9)", 1),
    ("torch.optim.SGD(parameters, lr=0.1)", 0), ("torch.optim.Adagrad(parameters)", 1),
])
def test_without_a_completed_step_the_optimizer_state_is_estimated_from_its_type(tmp_path, optimizer: str, states: int) -> None:
    from bsplan.measure.sources import measure_static

    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch\n\ndef build_model():\n    return torch.nn.Linear(100, 10)\n\n"
        "def make_batch(batch_size):\n    return torch.randn(batch_size, 100)\n\n"
        f"def build_optimizer(parameters):\n    return {optimizer}\n"
    )
    runner, device = _runner(model_file, 2**30)
    try:
        static = measure_static(runner.workload, runner.model, runner, "train")  # no trial has run
        assert not static.optimizer_state_measured
        assert static.optimizer_state_bytes == states * (100 * 10 + 10) * 4
        before = device.current_bytes()
        assert runner(4).fits  # a trial that completes steps: the measured state agrees (with a step counter each)
        assert runner.optimizer_state_bytes == pytest.approx(states * (100 * 10 + 10) * 4, abs=16) if states else (
            runner.optimizer_state_bytes is None)
        assert device.current_bytes() - before == (runner.optimizer_state_bytes or 0)  # kept between trials
    finally:
        device.tracking().__exit__(None, None, None)
