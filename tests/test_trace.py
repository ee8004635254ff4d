"""The trace engine: a step traced with fake tensors counts, to the byte, what the counted CPU limit
counts when the step runs for real; `bsplan estimate --memory` traced finds the probe's answer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, MODELS, bsplan

import bsplan as bsplan_api
from bsplan.backends.cpu import CpuDevice
from bsplan.backends.fake import FakeDevice
from bsplan.measure.trial import TrialRunner
from bsplan.measure.workload import load_workload
from bsplan.planning.results import Trial

GIB = 2**30
NEEDS_TRANSFORMERS = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (the hf extra)")


def _trial(device: CpuDevice | FakeDevice, model_file: Path, batch: int, precision: str, mode: str) -> Trial:
    workload = load_workload(model_file)
    with device.tracking():
        model = device.place(workload.build_model())
        model.train(mode == "train")
        runner = TrialRunner(workload, model, device, steps=2, precision=precision, mode=mode)
        trial = runner(batch)
    assert trial.fits
    return trial


@pytest.mark.parametrize(("model_file", "batch", "precision", "mode"), [
    (EXAMPLES / "cnn.py", 8, "fp32", "train"),  # BatchNorm, SGD with momentum
    (EXAMPLES / "cnn.py", 114, "fp32", "train"),
    (EXAMPLES / "mlp.py", 700, "fp32", "train"),  # AdamW
    (MODELS / "tiny.py", 64, "bf16", "train"),  # autocast
    (MODELS / "tiny.py", 64, "fp16", "train"),  # autocast and a GradScaler that always steps
    (MODELS / "tiny.py", 64, "fp32", "infer"),  # inference_mode
    (MODELS / "adafactor.py", 64, "fp32", "train"),  # a step that reads values, answered in the trace
    (EXAMPLES / "transformer.py", 6, "mixed", "train"),  # bf16 weights, fp32 master weights
    (MODELS / "dict_loss.py", 24, "fp32", "train"),  # a dict batch and an output with .loss
    (EXAMPLES / "transformer.py", 6, "fp32", "train"),  # nn.TransformerEncoder deep-copies its fake layer
    pytest.param(MODELS / "llama_small.py", 4, "fp32", "train", marks=NEEDS_TRANSFORMERS),  # a Hugging Face Llama
    pytest.param(MODELS / "llama_small.py", 4, "bf16", "train", marks=NEEDS_TRANSFORMERS),
])
def test_a_traced_step_counts_the_bytes_a_real_one_counts(model_file: Path, batch: int, precision: str, mode: str) -> None:
    real = _trial(CpuDevice(8 * GIB), model_file, batch, precision, mode)
    traced = _trial(FakeDevice(8 * GIB, "traced"), model_file, batch, precision, mode)
    assert (traced.peak_bytes, traced.forward_peak_bytes, traced.step_peak_bytes) == (
        real.peak_bytes, real.forward_peak_bytes, real.step_peak_bytes)


@pytest.mark.slow
@pytest.mark.parametrize(("example", "probed"), [("cnn.py", 114), ("mlp.py", 27039), ("transformer.py", 18)])
def test_a_traced_estimate_finds_the_probes_max_batch(workdir: Path, example: str, probed: int) -> None:
    """`bsplan probe EXAMPLE --device cpu --memory-limit 300MiB` finds `probed` (docs/probe.md; tests
    that check it against fresh processes: test_exact.py)."""
    run = bsplan("estimate", str(EXAMPLES / example), "--memory", "300MiB", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["max_batch"] == probed
    assert data["method"] == "trace" and all(trial["samples_per_second"] is None for trial in data["trials"])


def test_a_step_that_cannot_be_traced_is_run_for_real_and_says_so(workdir: Path) -> None:
    """A step that reads a tensor's value, which a fake tensor does not have: the estimate then
    measures real steps, with a note naming why."""
    run = bsplan("estimate", str(MODELS / "data_dependent.py"), "--memory", "64MiB", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["method"] == "run" and data["max_batch"] > 100
    assert any("could not be traced" in note and "DataDependentOutputException" in note for note in data["notes"])


def test_a_traced_estimate_for_a_gpu_searches_up_to_its_memory(workdir: Path) -> None:
    """No host memory is needed: the trace runs the search at batches that need tens of GiB."""
    run = bsplan("estimate", str(EXAMPLES / "cnn.py"), "--gpu", "H100-80GB", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["method"] == "trace" and data["max_batch"] > 10_000
    largest = max(trial["batch"] for trial in data["trials"] if trial["fits"])
    assert largest == data["max_batch"] and any(not trial["fits"] and trial["batch"] == largest + 1 for trial in data["trials"])
    budget = data["device"]["total_bytes"] - data["overheads"]["total_bytes"]
    assert max(trial["peak_bytes"] for trial in data["trials"] if trial["fits"]) <= budget < 80 * GIB


def test_the_tensors_at_the_traced_peak_are_told_apart_and_add_up_to_it() -> None:
    from bsplan.measure.attribution import compose_peak
    from bsplan.measure.options import ProbeOptions

    batch = 64
    train = compose_peak(MODELS / "tiny.py", ProbeOptions(device="cpu"), batch, GIB)
    real = _trial(CpuDevice(8 * GIB), MODELS / "tiny.py", batch, "fp32", "train")
    parameters = 4 * (64 * 256 + 256 + 256 * 8 + 8)
    assert train.peak_bytes == real.peak_bytes == sum((train.parameter_bytes, train.gradient_bytes, train.optimizer_state_bytes,
                                                       train.activation_bytes, train.temporary_bytes))
    # AdamW: exp_avg and exp_avg_sq the size of each parameter, and a 4-byte step count for each of the 4.
    assert train.parameter_bytes == train.gradient_bytes == parameters and train.optimizer_state_bytes == 2 * parameters + 4 * 4
    # Its peak is in the optimizer step, where of the activations only the batch is live: the first Linear saved it.
    assert [(m.name, m.activation_bytes) for m in train.top_modules] == [("0", 4 * batch * 64)] == [("0", train.activation_bytes)]
    infer = compose_peak(MODELS / "tiny.py", ProbeOptions(device="cpu", mode="infer"), batch, GIB)
    assert (infer.activation_bytes, infer.gradient_bytes, infer.optimizer_state_bytes, infer.top_modules) == (0, 0, 0, ())
    assert infer.parameter_bytes == parameters


def test_a_traced_estimate_shows_the_peak_by_kind_and_module(workdir: Path) -> None:
    run = bsplan("estimate", str(EXAMPLES / "transformer.py"), "--memory", "300MiB", "--json", cwd=workdir)
    data = run.json()
    peak = data["at_peak"]
    assert peak["batch"] == data["max_batch"] and peak["peak_bytes"] == max(t["peak_bytes"] for t in data["trials"] if t["fits"])
    names = [module["name"] for module in peak["top_modules"]]
    assert len(names) == 10 and "blocks.layers.0.self_attn" in names and "<outside any module>" in names
    table = bsplan("estimate", str(EXAMPLES / "transformer.py"), "--memory", "300MiB", cwd=workdir)
    assert "activations saved for backward" in table.stdout and "saved by blocks.layers.0.self_attn" in table.stdout


def test_at_the_peak_of_a_wide_model_the_saved_activations_are_named_by_module() -> None:
    from bsplan.measure.attribution import compose_peak
    from bsplan.measure.options import ProbeOptions

    peak = compose_peak(EXAMPLES / "cnn.py", ProbeOptions(device="cpu"), 32, GIB)
    sizes = [module.activation_bytes for module in peak.top_modules]
    assert len(sizes) == 10 and sizes == sorted(sizes, reverse=True) and sum(sizes) <= peak.activation_bytes
    assert peak.activation_bytes > peak.parameter_bytes + peak.optimizer_state_bytes  # a CNN's peak is its activations


@NEEDS_TRANSFORMERS
@pytest.mark.slow
def test_a_hugging_face_llama_is_traced_to_the_probes_answer(workdir: Path) -> None:
    estimate = bsplan("estimate", str(MODELS / "llama_small.py"), "--memory", "64MiB", "--json", cwd=workdir).json()
    probe = bsplan("probe", str(MODELS / "llama_small.py"), "--device", "cpu", "--memory-limit", "64MiB", "--json", cwd=workdir).json()
    assert estimate["method"] == "trace" and estimate["max_batch"] == probe["max_batch"] > 8


def test_where_no_batch_fits_one_device_the_estimate_says_how_many_would_hold_it(workdir: Path) -> None:
    """The model states of examples/mlp.py (13 MiB with AdamW) fill no 8 MiB device whole: the line is
    traced without a budget, and the fewest devices of each sharding strategy that hold batch 1 are
    named by the strategies' arithmetic: what an estimate under zero2 finds, and enough for a traced fsdp."""
    run = bsplan("estimate", str(EXAMPLES / "mlp.py"), "--memory", "8MiB", "--json", cwd=workdir)
    assert run.code == 3
    data = run.json()
    advice = next(note for note in data["notes"] if note.startswith("no batch fits"))
    assert data["max_batch"] is None and "fsdp on 8 devices" in advice and "zero2 on 4 devices" in advice
    for strategy, gpus, fits in (("fsdp", 8, True), ("zero2", 4, True), ("zero2", 2, False)):
        under = bsplan("estimate", str(EXAMPLES / "mlp.py"), "--memory", "8MiB", "--strategy", strategy, "--gpus", str(gpus),
                       "--json", cwd=workdir).json()
        assert (under["max_batch"] is not None) == fits, (strategy, gpus, under["max_batch"])


def test_a_gradient_that_sets_the_peak_is_counted_as_a_gradient() -> None:
    """The allocation that raises the peak is labelled by its phase when it is counted, and becomes
    a gradient only after: the peak keeps the label, not a copy of it."""
    from bsplan.measure.attribution import compose_peak
    from bsplan.measure.options import ProbeOptions

    peak = compose_peak(MODELS / "wide_layer.py", ProbeOptions(device="cpu"), 1, GIB)
    weight = 4 * 64 * 200_000
    assert peak.gradient_bytes >= weight and peak.temporary_bytes < weight, peak


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_strategy_traced_on_a_fake_group_counts_what_a_real_rank_counts(workdir: Path, strategy: str) -> None:
    """The real wrapper (DDP, FSDP2's fully_shard) traced on a fake process group of 2 ranks in one
    process: each trial's peaks are, to the byte, those of a rank of `probe --nproc 2`."""
    from bsplan.measure.options import ProbeOptions
    from bsplan.measure.probe import _Quiet, run_probe
    from bsplan.measure.trace import _fake_group

    batch = 512
    real = bsplan("probe", str(EXAMPLES / "mlp.py"), "--device", "cpu", "--memory-limit", "4GiB", "--nproc", "2", "--strategy",
                  strategy, "--min-batch", str(batch), "--max-batch", str(batch), "--no-save", "--json", cwd=workdir).json()
    options = ProbeOptions(device="cpu", memory_limit=4 * GIB, strategy=strategy, nproc=2, min_batch=batch, max_batch=batch)
    with _fake_group(2):
        traced = run_probe(EXAMPLES / "mlp.py", options, _Quiet(), backend=FakeDevice(4 * GIB, "traced"))
    peaks = [(t.peak_bytes, t.forward_peak_bytes, t.step_peak_bytes) for t in traced.trials]
    assert peaks == [(t["peak_bytes"], t["forward_peak_bytes"], t["step_peak_bytes"]) for t in real["trials"]]
    assert traced.breakdown.parameter_bytes == real["breakdown"]["parameter_bytes"]


@pytest.mark.slow
def test_a_traced_fsdp_estimate_finds_the_two_rank_probes_answer(workdir: Path) -> None:
    estimate = bsplan("estimate", str(EXAMPLES / "mlp.py"), "--memory", "300MiB", "--strategy", "fsdp", "--gpus", "2", "--json",
                      cwd=workdir).json()
    probe = bsplan("probe", str(EXAMPLES / "mlp.py"), "--device", "cpu", "--memory-limit", "300MiB", "--nproc", "2", "--strategy",
                   "fsdp", "--steps", "2", "--no-save", "--json", cwd=workdir).json()
    assert estimate["max_batch"] == probe["max_batch"] == 27300
    assert any("traced on a fake process group of 2 ranks" in note for note in estimate["notes"])


@pytest.mark.slow
def test_fsdp_traces_at_a_thousand_ranks_in_one_process(workdir: Path) -> None:
    run = bsplan("estimate", str(MODELS / "tiny.py"), "--memory", "64MiB", "--strategy", "fsdp", "--gpus", "1024", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    whole = 4 * (64 * 256 + 256 + 256 * 8 + 8)
    assert data["method"] == "trace" and data["max_batch"] is not None
    # This device's shard: each parameter split 1024 ways, padded up to a multiple of the world size.
    assert data["per_device"]["world_size"] == 1024 and whole / 1024 <= data["breakdown"]["parameter_bytes"] < whole / 50


class _Refreshing(torch.optim.SGD):
    """A preconditioner refreshed every other step, as Shampoo's is: a read value decides an allocation."""

    def __init__(self, parameters: object) -> None:
        super().__init__(parameters, lr=0.1)  # type: ignore[arg-type]
        self.count = torch.zeros(())

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        self.count += 1
        if int(self.count.item()) % 2 == 0:
            self.state[self.param_groups[0]["params"][0]]["preconditioner"] = torch.zeros(1 << 20)
        super().step()


def test_a_custom_optimizer_that_reads_a_value_is_run_for_real_not_answered() -> None:
    """Only torch's own optimizers have their reads answered in a trace (Adafactor's, above): another's
    read can size a tensor, so its step is run for real, and the estimate says why."""
    from tiny import build_model, make_batch

    result = bsplan_api.estimate(build_model, make_batch, optimizer=_Refreshing, memory="16MiB")
    assert result.method == "run" and any("could not be traced" in note for note in result.notes)
