"""`bsplan estimate`: within 10% of the CPU probe on every example, a breakdown for a catalogue GPU,
and `bsplan plan` taking its limit from an estimate or a probe scaled to a named GPU, without torch."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
from conftest import EXAMPLES, MODELS, bsplan
from no_torch import run_without_torch
from typer.testing import CliRunner

from bsplan.cli import app as cli
from bsplan.measure.estimate import measure
from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import run_probe
from bsplan.planning.catalog import find_gpu
from bsplan.planning.prediction import EstimateOptions, Measurement, predict_for
from bsplan.planning.results import Breakdown, DeviceInfo, ModelInfo, ProbeResult, Trial

MIB = 2**20
LIMIT = 300 * MIB


class Quiet:
    def started(self, batch: int) -> None: ...
    def finished(self, trial: Trial) -> None: ...
    def note(self, text: str) -> None: ...


@functools.cache
def measured(example: str) -> Measurement:
    """Each example measured once, for a 300 MiB budget; every prediction from it is arithmetic."""
    return measure(EXAMPLES / example, "fp32", "train", Quiet(), LIMIT)


def _probe_fits(example: str, batch: int) -> bool:
    """`bsplan probe --device cpu --memory-limit 300MiB --min-batch B --max-batch B --steps 2`, in-process.
    Two steps peak at the same bytes as the default three on these examples, in two thirds of the time."""
    options = ProbeOptions(device="cpu", memory_limit=LIMIT, steps=2, min_batch=batch, max_batch=batch)
    return run_probe(EXAMPLES / example, options, Quiet()).max_batch == batch


@pytest.mark.parametrize("example", ["mlp.py", "cnn.py", "transformer.py"])
def test_the_estimate_is_within_10_percent_of_the_cpu_probe(example: str) -> None:
    estimate = predict_for(measured(example), EstimateOptions(memory_bytes=LIMIT)).max_batch
    assert estimate is not None
    # The probe's max_batch P lies in [estimate / 1.1, estimate / 0.9], i.e. |estimate - P| <= 10% of P,
    # exactly when the probe fits the lower end and not one past the upper end (a larger batch never fits
    # where a smaller one did not: the probe's search assumes the same).
    assert _probe_fits(example, math.ceil(estimate / 1.1))
    assert not _probe_fits(example, math.floor(estimate / 0.9) + 1)


def test_a_named_gpu_gets_a_max_batch_with_its_breakdown_and_overheads() -> None:
    result = predict_for(measured("transformer.py"), EstimateOptions(gpu=find_gpu("H100-80GB")))
    assert result.device.name == "H100-SXM-80GB (NVIDIA H100 80GB HBM3)" and result.device.type == "cuda"
    assert result.overheads.cuda_context_bytes == 2**30 and result.overheads.cublas_workspace_bytes == 66 * MIB
    per_sample = result.breakdown.activation_bytes_per_sample
    assert per_sample == result.fit.per_sample_bytes and per_sample > 10 * MIB
    free = result.device.total_bytes - result.overheads.total_bytes - result.fit.base_bytes
    assert result.max_batch == math.floor(free / per_sample) > 1000
    assert result.recommended_batch is not None and result.recommended_batch % 8 == 0 and result.recommended_batch < result.max_batch
    # A GPU with only 20 GiB free fits about a quarter as much.
    shared = predict_for(measured("transformer.py"), EstimateOptions(gpu=find_gpu("h100"), memory_bytes=20 * 2**30))
    assert shared.device.limit_source == "--memory" and shared.max_batch < result.max_batch / 3  # type: ignore[operator]


def test_the_cli_json_has_the_probe_fields_marked_estimated(workdir: Path) -> None:
    run = bsplan("estimate", str(EXAMPLES / "cnn.py"), "--gpu", "H100-80GB", "--method", "run", "--json", "--output", "est.json",
                 cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["schema"] == "bsplan.estimate/1" and data["estimated"] is True and data["method"] == "run"
    assert data["max_batch"] > 10_000 and data["recommended_batch"] < data["max_batch"]
    assert data["device"]["type"] == "cuda" and data["gpu"]["key"] == "H100-SXM-80GB"
    assert set(data["breakdown"]) == {
        "parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "optimizer_state_measured",
        "activation_bytes_per_sample", "bucket_bytes", "gathered_bytes", "static_bytes",
    }
    assert (data["strategy"], data["world_size"], data["static_bytes"]) == ("none", 1, data["breakdown"]["static_bytes"])
    assert data["breakdown"]["optimizer_state_bytes"] == data["breakdown"]["parameter_bytes"]  # SGD momentum
    assert set(data["overheads"]) == {"cuda_context_bytes", "cublas_workspace_bytes", "allocator_reserve_bytes", "total_bytes"}
    assert [t["batch"] for t in data["trials"]] == [1, 2, 4, 8] and all(t["fits"] for t in data["trials"])
    assert "batch       8  fits" in run.stderr  # progress on stderr, JSON alone on stdout
    assert json.loads((workdir / "est.json").read_text()) == data


@pytest.mark.parametrize(("args", "message"), [
    (["--gpu", "a100"], "fits several GPUs with different memory"),
    ([], "give --gpu NAME"),
    (["--memory", "300MiB", "--cuda-context", "1GiB"], "--cuda-context applies to a --gpu"),
    (["--memory", "lots"], "cannot read 'lots' as a memory size"),
])
def test_bad_input_is_one_sentence_and_exit_2(args: list[str], message: str) -> None:
    run = CliRunner().invoke(cli.app, ["estimate", str(MODELS / "tiny.py"), *args, "--json"])
    assert run.exit_code == 2 and message in json.loads(run.output)["error"]


def _plan(workdir: Path, *args: str) -> dict:  # type: ignore[type-arg]
    return json.loads(run_without_torch("plan", *args, "--json", cwd=workdir))


def _cpu_probe(path: Path) -> None:
    """A saved CPU probe of examples/cnn.py under 300 MiB, as its trials measured it."""
    line = {1: 3740632, 8: 22795280, 61: 167810488, 114: 312825696}
    trials = [Trial(b, True, peak, 1.0, 10.0 * b) for b, peak in line.items()] + [Trial(115, False, None, 0.5, None, error="out of memory")]
    result = ProbeResult(
        model=ModelInfo("examples/cnn.py", 106_000, True), device=DeviceInfo("cpu", "cpu", LIMIT, "--memory-limit", True),
        mode="train", precision="fp32", steps=3, multiple_of=1, headroom=0.1, max_batch=114, first_oom_batch=115,
        recommended_batch=96, peak_bytes=312825696, breakdown=Breakdown(425488, 425488, 425488, True, 2736136.0), trials=trials,
    )
    path.write_text(json.dumps(result.to_dict()))


def test_plan_scales_a_cpu_probe_to_a_named_gpu(workdir: Path) -> None:
    _cpu_probe(workdir / "probe.json")
    data = _plan(workdir, "--target", "65536", "--gpus", "2", "--from", "probe.json", "--gpu", "L4")
    limit = data["limit"]
    assert limit["gpu"] == "L4-24GB" and limit["source"] == "recommended_batch"
    # 90% of 22.5 GiB, less 1 GiB and the workspaces, over 2.61 MiB per sample: about 7,300, rounded to 8s.
    assert 7000 < limit["micro_batch"] < 7600 and limit["micro_batch"] % 8 == 0
    assert data["micro_batch"] <= limit["micro_batch"]
    assert any("estimated for L4-24GB" in note for note in data["notes"])
    assert not any(w["code"] == "above-probed-max" for w in data["warnings"])


def test_plan_takes_its_limit_from_a_saved_estimate(workdir: Path) -> None:
    estimate = predict_for(measured("cnn.py"), EstimateOptions(gpu=find_gpu("A100-80GB")))
    (workdir / "est.json").write_text(json.dumps(estimate.to_dict()))
    target = ("--target", str(8 * 65536), "--gpus", "8", "--from", "est.json")
    data = _plan(workdir, *target)
    assert data["limit"]["micro_batch"] == estimate.recommended_batch and data["limit"]["gpu"] is None
    assert data["limit"]["probe"]["device"] == "A100-SXM4-80GB (NVIDIA A100-SXM4-80GB)"
    rescaled = _plan(workdir, *target, "--gpu", "t4")  # 15 GiB instead of 80: about a fifth
    ratio = rescaled["limit"]["micro_batch"] / estimate.recommended_batch  # type: ignore[operator]
    assert rescaled["limit"]["gpu"] == "T4-16GB" and 0.15 < ratio < 0.2


def test_plan_gpu_needs_a_probe_and_no_max_micro(workdir: Path) -> None:
    run = bsplan("plan", "--target", "64", "--gpu", "h100", cwd=workdir)
    assert run.code == 2 and "--gpu scales a probe's memory" in run.stderr
    run = bsplan("plan", "--target", "64", "--gpu", "h100", "--max-micro", "8", cwd=workdir)
    assert run.code == 2 and "give one of them" in run.stderr


def test_a_model_too_large_to_build_here_is_refused_in_one_sentence_not_a_traceback() -> None:
    """--method run builds the model in this machine's memory: where building it runs out (an 8B model
    on a laptop), one sentence that says to trace it, as probe says of a model that does not fit."""
    import torch

    import bsplan as bsplan_api
    from bsplan.planning.errors import NoFit

    def too_large() -> torch.nn.Module:
        raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 32000000000 bytes")

    with pytest.raises(NoFit, match=r"building it ran out of this machine's memory .*\(--method trace\)"):
        bsplan_api.estimate(too_large, lambda size: torch.zeros(size, 4), memory="1GiB", method="run")
