"""The Python API on callables: bsplan.probe, bsplan.estimate and bsplan.plan give the results the
commands give for the same model written as a model file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import MODELS
from torch import nn

import bsplan
from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import run_probe
from bsplan.planning.errors import BadInput, UserCodeError


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))


def make_batch(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 64)


class _Quiet:
    def started(self, batch: int) -> None: ...
    def finished(self, trial: object) -> None: ...
    def note(self, text: str) -> None: ...


def test_importing_bsplan_loads_no_torch() -> None:
    """Not even for bsplan.NoiseScale, which loads torch only when asked for."""
    code = ("import sys, bsplan; print(callable(bsplan.probe), 'torch' in sys.modules); "
            "print(bsplan.NoiseScale.__module__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "bsplan.runtime.noise", "True"]


def test_probe_on_callables_finds_what_the_model_file_finds() -> None:
    """tests/models/tiny.py defines the same two functions."""
    from_file = run_probe(MODELS / "tiny.py", ProbeOptions(device="cpu", memory_limit=8 * 2**20), _Quiet())
    result = bsplan.probe(build_model, make_batch, device="cpu", memory_limit="8MiB")
    assert result.max_batch == from_file.max_batch is not None
    assert result.peak_bytes == from_file.peak_bytes
    assert result.model.file == f"{__name__}.build_model"


def test_the_loss_and_the_optimizer_are_callables_too() -> None:
    seen = []

    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return model(batch).square().mean()

    result = bsplan.probe(build_model, make_batch, loss=loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                          device="cpu", memory_limit="8MiB", max_batch=16)
    assert seen and result.max_batch == 16
    assert result.breakdown.optimizer_state_bytes == result.breakdown.parameter_bytes  # one momentum buffer


def test_estimate_on_callables_traces_the_probe_s_answer_and_plan_takes_the_result() -> None:
    probed = bsplan.probe(build_model, make_batch, device="cpu", memory_limit="8MiB")
    estimated = bsplan.estimate(build_model, make_batch, memory="8MiB")
    assert estimated.method == "trace" and estimated.max_batch == probed.max_batch
    planned = bsplan.plan(8 * probed.max_batch, gpus=2, probe=probed, use="max")  # type: ignore[operator]
    assert planned.micro_batch * planned.accumulation_steps * 2 == 8 * probed.max_batch  # type: ignore[operator]
    assert planned.micro_batch <= probed.max_batch  # type: ignore[operator]


def test_make_batch_with_a_sequence_length() -> None:
    embed = 32

    def build() -> nn.Module:
        return nn.Sequential(nn.Embedding(100, embed), nn.Linear(embed, 100))

    def tokens(batch_size: int, seq_len: int) -> torch.Tensor:
        return torch.randint(0, 100, (batch_size, seq_len))

    short = bsplan.estimate(build, tokens, memory="16MiB", seq_len=16)
    long = bsplan.estimate(build, tokens, memory="16MiB", seq_len=64)
    assert short.model.seq_len == 16 and long.max_batch < short.max_batch  # type: ignore[operator]


def test_bad_input_and_user_errors_raise_as_the_commands_report_them() -> None:
    with pytest.raises(BadInput, match="cannot read"):
        bsplan.probe(build_model, make_batch, device="cpu", memory_limit="lots")
    with pytest.raises(BadInput, match="must return a tensor"):
        bsplan.probe(build_model, lambda batch_size: [1.0] * batch_size, device="cpu", memory_limit="8MiB")

    def broken(batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, 3)  # the model takes 64 features

    with pytest.raises(UserCodeError, match="mat1 and mat2"):
        bsplan.probe(build_model, broken, device="cpu", memory_limit="8MiB")


def test_lambdas_cannot_go_to_other_processes_and_say_so() -> None:
    with pytest.raises(BadInput, match="cannot receive local functions or lambdas"):
        bsplan.probe(lambda: build_model(), make_batch, device="cpu", memory_limit="8MiB", nproc=2, strategy="ddp")
