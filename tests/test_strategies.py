"""Memory per device under DDP, ZeRO 1-3 and FSDP: the ZeRO paper's worked case, each strategy's
formula, `bsplan estimate --strategy` and `--params`, `bsplan plan --strategy` (and auto) from a saved
probe, the exports, and the estimate against the real 2-process probe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import EXAMPLES, MODELS
from hypothesis import given
from hypothesis import strategies as st
from no_torch import run_without_torch
from test_estimate import LIMIT, Quiet, measured
from typer.testing import CliRunner

from bsplan.cli import app as cli
from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import run_probe
from bsplan.planning.choices import Strategy
from bsplan.planning.export import export_plan
from bsplan.planning.memory_line import MemoryLine
from bsplan.planning.plan import PlanOptions
from bsplan.planning.planner import make_plan
from bsplan.planning.prediction import EstimateOptions, Measurement, predict_for
from bsplan.planning.results import Breakdown, DeviceInfo, ModelInfo, ProbeResult, Trial
from bsplan.planning.strategies import BY_SIMPLICITY, SINGLE, Layout, ModelStates, gathered_bytes, per_device, per_device_line

GIB = 2**30
MIB = 2**20


# --- the memory model --------------------------------------------------------------------------

# Rajbhandari et al. 2019, Figure 1: 7.5B parameters, Adam, mixed precision, 64 devices, in decimal GB.
# Its data-parallel baseline counts no DDP bucket, which is DDP with gradient_as_bucket_view.
FIGURE_1 = [(Layout("ddp", 64, bucket_view=True), 120.0), (Layout("zero1", 64), 31.4), (Layout("zero2", 64), 16.6),
            (Layout("zero3", 64), 1.9)]


@pytest.mark.parametrize(("layout", "gigabytes"), FIGURE_1, ids=[layout.strategy for layout, _ in FIGURE_1])
def test_the_zero_paper_figure_1_case(layout: Layout, gigabytes: float) -> None:
    states = per_device(ModelStates.count(7.5e9, "adam", "mixed"), layout)
    assert round(states.static_bytes / 1e9, 1) == gigabytes


def test_mixed_precision_adam_is_16_bytes_a_parameter_and_fp32_keeps_fp32_weights() -> None:
    assert ModelStates.count(1, "adam", "mixed") == ModelStates(2, 2, 12, 2)  # ZeRO paper, section 3.1: 2 + 2 + 12
    assert ModelStates.count(1, "adamw", "fp32") == ModelStates(4, 4, 8, 4)
    assert ModelStates.count(1, "sgd", "bf16") == ModelStates(4, 4, 4, 4)  # autocast keeps fp32 weights and gradients
    assert ModelStates.count(1, "lars", "mixed") == ModelStates(2, 2, 8, 2)  # fp32 master copy and momentum


def test_each_strategy_keeps_what_figure_1_says_plus_buckets_and_gathered_units() -> None:
    replica = ModelStates(parameter_bytes=100, gradient_bytes=100, optimizer_state_bytes=200, bucket_bytes=100, gathered_bytes=30)
    parts = lambda layout: (lambda d: (d.parameter_bytes, d.gradient_bytes, d.optimizer_state_bytes, d.bucket_bytes,  # noqa: E731
                                       d.gathered_bytes))(per_device(replica, layout))
    assert parts(SINGLE) == (100, 100, 200, 0, 0)
    assert parts(Layout("ddp", 4)) == (100, 100, 200, 100, 0)
    assert parts(Layout("ddp", 4, bucket_view=True)) == (100, 0, 200, 100, 0)  # the gradients live in the buckets
    assert parts(Layout("zero1", 4)) == (100, 100, 50, 0, 0)
    assert parts(Layout("zero2", 4)) == (100, 25, 50, 0, 0)
    assert parts(Layout("zero3", 4)) == parts(Layout("fsdp", 4)) == (25, 25, 50, 0, 30)
    assert per_device(replica, Layout("fsdp", 4)).to_dict() == {
        "strategy": "fsdp", "world_size": 4, "bucket_view": False, "parameter_bytes": 25, "gradient_bytes": 25,
        "optimizer_state_bytes": 50, "bucket_bytes": 0, "gathered_bytes": 30, "static_bytes": 130,
    }


def test_the_peak_line_moves_by_the_states_live_at_the_peak() -> None:
    # Activations dominate: the single-process peak holds parameters and optimizer state, no gradients yet.
    replica = ModelStates(100, 100, 200, 100, gathered_bytes=30)
    line = MemoryLine(base_bytes=300, per_sample_bytes=7)
    assert per_device_line(line, replica, Layout("ddp", 2)) == MemoryLine(400, 7)  # the buckets stay allocated
    assert per_device_line(line, replica, Layout("ddp", 2, bucket_view=True)) == MemoryLine(400, 7)
    assert per_device_line(line, replica, Layout("zero1", 2)) == MemoryLine(200, 7)
    assert per_device_line(line, replica, Layout("zero2", 2)) == MemoryLine(250, 7)  # a kept gradient shard, no saving
    assert per_device_line(line, replica, Layout("fsdp", 2)) == MemoryLine(50 + 50 + 100 + 30, 7)
    # Every gradient live at the peak (the optimizer step dominates): the bucket view saves their copy.
    full = MemoryLine(400, 7)
    assert per_device_line(full, replica, Layout("ddp", 2)) == MemoryLine(500, 7)
    assert per_device_line(full, replica, Layout("ddp", 2, bucket_view=True)) == MemoryLine(400, 7)
    assert per_device_line(full, replica, Layout("zero2", 2)) == MemoryLine(250, 7)


layouts = st.builds(Layout, st.sampled_from(list(Strategy)[1:]), st.integers(1, 64), st.booleans()).map(
    lambda layout: Layout(layout.strategy, layout.world_size, layout.bucket_view and layout.strategy == "ddp"))


@given(
    parameters=st.integers(0, 10**9), optimizer=st.integers(0, 10**9), extra=st.integers(0, 10**9),
    live=st.floats(0, 1), per_sample=st.integers(1, 10**6), measured=layouts, target=layouts,
)
def test_a_line_measured_under_one_strategy_gives_the_same_line_for_another(
    parameters: int, optimizer: int, extra: int, live: float, per_sample: int, measured: Layout, target: Layout
) -> None:
    """Through a strategy that keeps the gradients whole (none, ddp without bucket view, zero1) the
    single-process line is recovered exactly, so the target's line is the one from one process."""
    replica = ModelStates(parameters, parameters, optimizer, parameters, gathered_bytes=extra // 7)
    single = MemoryLine(parameters + optimizer + live * parameters + extra, per_sample)
    if measured.strategy in ("ddp", "zero1") and not measured.bucket_view:
        via = per_device_line(per_device_line(single, replica, measured), replica, target, measured)
        assert via.base_bytes == pytest.approx(per_device_line(single, replica, target).base_bytes, rel=1e-9, abs=1e-3)
    assert per_device_line(single, replica, target).per_sample_bytes == per_sample


def test_fsdp_gathers_the_root_s_unit_and_two_of_the_largest() -> None:
    import torch

    from bsplan.models.blocks import fsdp_units

    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    assert gathered_bytes(model, fsdp_units(model)) == 2 * (784 * 512 + 512) * 4
    model.register_parameter("scale", torch.nn.Parameter(torch.ones(3)))  # the root holds one directly
    assert gathered_bytes(model, fsdp_units(model)) == 3 * 4 + 2 * (784 * 512 + 512) * 4
    # A tied embedding and head stay in the root's unit, which FSDP keeps gathered: counted there.
    embed, head = torch.nn.Embedding(100, 8), torch.nn.Linear(8, 100, bias=False)
    head.weight = embed.weight
    tied = torch.nn.Sequential(embed, torch.nn.Linear(8, 8), head)
    assert gathered_bytes(tied, fsdp_units(tied)) == 100 * 8 * 4 + 2 * (8 * 8 + 8) * 4


# --- bsplan estimate ---------------------------------------------------------------------------

def _estimate(*args: str) -> dict:  # type: ignore[type-arg]
    run = CliRunner().invoke(cli.app, ["estimate", *args, "--json"])
    assert run.exit_code == 0, run.output
    return json.loads(run.output)


def test_estimate_params_gives_figure_1_s_zero1_states_in_json() -> None:
    data = _estimate("--params", "7.5e9", "--optimizer", "adam", "--precision", "mixed", "--strategy", "zero1", "--gpus", "64")
    assert data["schema"] == "bsplan.states/1"
    assert (data["strategy"], data["world_size"], data["activations_included"]) == ("zero1", 64, False)
    assert data["static_bytes"] == pytest.approx(31.4e9, rel=0.01)
    assert data["max_batch"] is None and any("without activations" in note for note in data["notes"])


def test_estimate_params_says_what_a_count_cannot_know_and_fits_a_batch_with_activations() -> None:
    data = _estimate("--params", "1B", "--strategy", "fsdp", "--gpus", "8", "--activation-bytes-per-sample", "100MiB",
                     "--memory", "20GiB", "--headroom", "0")
    assert data["static_bytes"] == 16e9 / 8  # AdamW in fp32: 16 bytes a parameter, sharded over 8
    assert data["max_batch"] == math.floor((20 * GIB - 2e9) / (100 * MIB))
    assert any("cannot know" in note for note in data["notes"])


@pytest.mark.parametrize(("args", "message"), [
    (["--params", "1e9", str(MODELS / "tiny.py")], "one of the two"),
    ([str(MODELS / "tiny.py"), "--memory", "1GiB", "--gpus", "4"], "--gpus counts the devices"),
    ([str(MODELS / "tiny.py"), "--memory", "1GiB", "--strategy", "zero2", "--bucket-view"], "goes with --strategy ddp"),
    ([str(MODELS / "tiny.py"), "--memory", "1GiB", "--optimizer", "sgd"], "go with --params"),
    (["--params", "lots"], "cannot read 'lots' as a parameter count"),
])
def test_estimate_refuses_mixed_up_inputs_in_one_sentence(args: list[str], message: str) -> None:
    run = CliRunner().invoke(cli.app, ["estimate", *args, "--json"])
    assert run.exit_code == 2 and message in json.loads(run.output)["error"], run.output


def _measurement() -> Measurement:
    """A CPU measurement as estimate.measure returns it: 10 MB of parameters, AdamW, 1 MB per sample."""
    breakdown = Breakdown(10_000_000, 10_000_000, 20_000_000, True, 1e6, gathered_bytes=4_000_000)
    trials = (Trial(4, True, 34_000_000, 1.0, None), Trial(8, True, 38_000_000, 1.0, None))
    return Measurement(ModelInfo("model.py", 2_500_000, False), breakdown, MemoryLine(30_000_000, 1e6), trials, ())


@pytest.mark.parametrize(("layout", "base"), [
    (SINGLE, 30e6), (Layout("ddp", 2), 40e6), (Layout("zero1", 4), 15e6), (Layout("fsdp", 4), 40e6 / 4 + 4e6),
])
def test_estimate_model_per_device_under_a_strategy(layout: Layout, base: float) -> None:
    result = predict_for(_measurement(), EstimateOptions(memory_bytes=300_000_000, layout=layout))
    assert result.fit == MemoryLine(base, 1e6) and result.max_batch == math.floor((300e6 - base) / 1e6)
    data = result.to_dict()
    assert (data["strategy"], data["world_size"]) == (layout.strategy, layout.world_size)
    assert data["static_bytes"] == round(per_device(ModelStates(10e6, 10e6, 20e6, 10e6, 4e6), layout).static_bytes)
    assert data["breakdown"]["parameter_bytes"] == 10_000_000  # the breakdown stays the one process measured


# --- bsplan plan -------------------------------------------------------------------------------

# A 1B-parameter model in fp32 with AdamW probed alone on a 40 GiB GPU: 4 + 4 + 8 GiB of states, and
# 256 MiB of activations per sample; at the peak (start of backward) no gradients exist yet.
P, G, O, PER_SAMPLE, TOTAL = 4 * GIB, 4 * GIB, 8 * GIB, 256 * MIB, 40 * GIB


def _probe(path: Path, *, strategy: str = "none", world_size: int = 1, base: float = P + O, shards: int = 1) -> Path:
    """A saved probe whose trials lie on base + PER_SAMPLE x b; max and recommended as the probe finds them."""
    most = math.floor((TOTAL - base) / PER_SAMPLE)
    trials = [Trial(b, True, round(base + PER_SAMPLE * b), 1.0, None) for b in (most // 4, most // 2, most)]
    recommended = math.floor((0.9 * TOTAL - base) / PER_SAMPLE)
    result = ProbeResult(
        model=ModelInfo("models/big.py", 10**9, False), device=DeviceInfo("cuda:0 (NVIDIA A100-SXM4-40GB)", "cuda", TOTAL, "device", True),
        mode="train", precision="fp32", steps=3, multiple_of=1, headroom=0.1, max_batch=most, first_oom_batch=most + 1,
        recommended_batch=recommended - recommended % 8, peak_bytes=None,
        breakdown=Breakdown(P // shards, G // shards, O // shards, True, PER_SAMPLE, gathered_bytes=256 * MIB),
        trials=trials + [Trial(most + 1, False, None, 1.0, None, "CUDA out of memory")], world_size=world_size, strategy=strategy,
    )
    path.write_text(json.dumps(result.to_dict()))
    return path


def _plan(tmp_path: Path, target: int, strategy: str, **options: object) -> dict:  # type: ignore[type-arg]
    values = dict(global_batch=target, gpus_per_node=4, probe_file=tmp_path / "probe.json", strategy=strategy)
    return make_plan(PlanOptions(**{**values, **options})).to_dict()  # type: ignore[arg-type]


def _recommended(base: float) -> int:
    best = math.floor((0.9 * TOTAL - base) / PER_SAMPLE)
    return best - best % 8


# Per device on 4 GPUs (GiB): ddp 4 + 8 + 4 buckets; zero1 4 + 8/4; zero2 4 + 4/4 + 8/4; fsdp and zero3 16/4 + 0.25.
LIMITS = {"ddp": _recommended(16 * GIB), "zero1": _recommended(6 * GIB), "zero2": _recommended(7 * GIB),
          "fsdp": _recommended(4.25 * GIB), "zero3": _recommended(4.25 * GIB)}


@pytest.mark.parametrize("strategy", BY_SIMPLICITY)
def test_plan_recomputes_the_probe_s_limit_for_a_strategy(tmp_path: Path, strategy: str) -> None:
    _probe(tmp_path / "probe.json")
    data = _plan(tmp_path, 4 * 512, strategy)
    assert data["strategy"] == strategy and data["limit"]["strategy"] == strategy
    assert data["limit"]["micro_batch"] == LIMITS[strategy] and data["limit"]["source"] == "recommended_batch"
    assert any(note.startswith(f"the per-device limit is recomputed for {strategy} on 4 devices from the probe of models/big.py")
               for note in data["notes"])
    assert not any(w["code"] == "above-probed-max" for w in data["warnings"])


def test_plan_keeps_a_probe_s_measured_edge_and_moves_it(tmp_path: Path) -> None:
    # max_batch moves as far as the line's prediction does: 112 alone, 16 fewer under ddp (4 GiB of buckets).
    _probe(tmp_path / "probe.json")
    data = _plan(tmp_path, 4 * 512, "ddp", use="max")
    assert data["limit"]["micro_batch"] == 112 - 16 and data["limit"]["source"] == "max_batch"


def test_plan_from_a_strategy_probe_recomputes_through_one_process(tmp_path: Path) -> None:
    # The same model probed under ddp on 2 devices: its line holds the buckets; its breakdown is per device.
    _probe(tmp_path / "probe.json", strategy="ddp", world_size=2, base=P + O + G)
    assert _plan(tmp_path, 4 * 512, "zero1")["limit"]["micro_batch"] == LIMITS["zero1"]
    assert _plan(tmp_path, 4 * 512, "ddp")["limit"]["micro_batch"] == LIMITS["ddp"]
    # Under fsdp on 2 devices (a shard's breakdown): back to fsdp on 4 exactly; gradients live at its peak
    # cannot be told apart, so the others count them all (the safe side).
    _probe(tmp_path / "probe.json", strategy="fsdp", world_size=2, base=(P + G + O) / 2 + 256 * MIB, shards=2)
    assert _plan(tmp_path, 4 * 512, "fsdp")["limit"]["micro_batch"] == LIMITS["fsdp"]
    assert _plan(tmp_path, 4 * 512, "ddp")["limit"]["micro_batch"] == _recommended(20 * GIB)
    unchanged = _plan(tmp_path, 4 * 512, "none")
    assert unchanged["limit"]["micro_batch"] == _recommended((P + G + O) / 2 + 256 * MIB)
    assert any("give --strategy fsdp to recompute it for 4 devices" in note for note in unchanged["notes"])


def test_plan_from_a_saved_strategy_estimate_matches_the_estimate_for_the_other_strategy(tmp_path: Path) -> None:
    saved = predict_for(_measurement(), EstimateOptions(memory_bytes=300_000_000, layout=Layout("ddp", 2)))
    (tmp_path / "probe.json").write_text(json.dumps(saved.to_dict()))
    direct = predict_for(_measurement(), EstimateOptions(memory_bytes=300_000_000, layout=Layout("zero1", 4)))
    assert _plan(tmp_path, 4 * 1024, "zero1")["limit"]["micro_batch"] == direct.recommended_batch == 248
    assert _plan(tmp_path, 4 * 1024, "zero1", use="max")["limit"]["micro_batch"] == direct.max_batch == 285


def test_plan_auto_lists_every_strategy_and_recommends_the_simplest_of_the_fewest_steps(tmp_path: Path) -> None:
    _probe(tmp_path / "probe.json")
    data = _plan(tmp_path, 4 * 480, "auto")
    rows = {row["strategy"]: row for row in data["strategies"]}
    assert [row["strategy"] for row in data["strategies"]] == list(BY_SIMPLICITY)
    for name, row in rows.items():
        assert row["max_micro_batch"] == LIMITS[name]
        assert row["micro_batch"] == max(m for m in range(1, 481) if 480 % m == 0 and m <= LIMITS[name])
        assert row["micro_batch"] * row["accumulation_steps"] == 480
    assert (rows["ddp"]["accumulation_steps"], rows["zero1"]["accumulation_steps"], rows["fsdp"]["accumulation_steps"]) == (6, 4, 4)
    assert data["strategy"] == "zero1" and data["micro_batch"] == 120 and data["accumulation_steps"] == 4
    assert data["notes"][0].startswith("--strategy auto recommends zero1")


def test_plan_auto_on_a_catalogue_gpu_and_its_table(workdir: Path) -> None:
    _probe(workdir / "probe.json")
    run = CliRunner().invoke(cli.app, ["plan", "--target", "1920", "--gpus", "4", "--from", "probe.json", "--strategy", "auto"],
                             env={"COLUMNS": "160"})
    assert run.exit_code == 0, run.output
    assert "│ zero1 (recommended by --strategy auto)" in run.output
    assert "strategies on 4 devices, simplest first" in run.output and "│ zero3    │" in run.output
    data = make_plan(PlanOptions(global_batch=1920, gpus_per_node=4, probe_file=workdir / "probe.json", strategy="auto",
                                 gpu="H100-80GB")).to_dict()
    # On 80 GB (less 10% and the CUDA overheads) ddp fits 216 a device, the rest 248 to 264: 480 = 160 x 3 or 240 x 2.
    assert data["limit"]["gpu"] == "H100-SXM-80GB" and data["limit"]["strategy"] == "zero1"
    assert [row["accumulation_steps"] for row in data["strategies"]] == [3, 2, 2, 2, 2] and data["strategy"] == "zero1"


@pytest.mark.parametrize(("args", "message"), [
    (("--strategy", "ddp", "--max-micro", "8"), "give one of them"),
    (("--strategy", "zero2", "--bucket-view"), "goes with --strategy ddp"),
    (("--strategy", "fsdp"), "--strategy recomputes the limit from a probe's memory breakdown"),
    (("--strategy", "auto"), "--strategy auto compares strategies from a probe's memory breakdown"),
])
def test_plan_strategy_bad_input_is_one_sentence(workdir: Path, args: tuple[str, ...], message: str) -> None:
    run = CliRunner().invoke(cli.app, ["plan", "--target", "64", *args, "--json"])
    assert run.exit_code == 2 and message in json.loads(run.output)["error"], run.output


def test_plan_strategy_auto_never_imports_torch(tmp_path: Path) -> None:
    _probe(tmp_path / "probe.json")
    out = run_without_torch("plan", "--target", "1920", "--gpus", "4", "--from", "probe.json", "--strategy", "auto",
                            "--format", "deepspeed", cwd=tmp_path)
    assert json.loads(out)["zero_optimization"] == {"stage": 1}


# --- exports -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("strategy", "stage", "lightning"), [
    ("ddp", 0, "ddp"), ("zero1", 1, "deepspeed_stage_1"), ("zero2", 2, "deepspeed_stage_2"),
    ("zero3", 3, "deepspeed_stage_3"), ("fsdp", None, "fsdp"),
])
def test_each_export_carries_the_strategy(tmp_path: Path, strategy: str, stage: int | None, lightning: str) -> None:
    _probe(tmp_path / "probe.json")
    plan = make_plan(PlanOptions(global_batch=2048, gpus_per_node=4, probe_file=tmp_path / "probe.json", strategy=strategy))
    deepspeed = export_plan(plan, "deepspeed")
    config = json.loads(deepspeed.text)
    assert config.get("zero_optimization") == (None if stage is None else {"stage": stage})
    assert (stage is None) == any("not DeepSpeed" in note for note in deepspeed.notes)
    trainer = dict(line.strip().split(": ") for line in export_plan(plan, "lightning").text.splitlines()[1:])
    assert trainer["strategy"] == lightning and int(trainer["accumulate_grad_batches"]) == plan.accumulation_steps
    arguments = json.loads(export_plan(plan, "hf").text)
    if strategy == "fsdp":
        assert arguments["fsdp"] == "full_shard auto_wrap" and arguments["fsdp_config"] == {"fsdp_version": 2}
    elif stage:
        assert arguments["deepspeed"]["zero_optimization"] == {"stage": stage}
        assert arguments["deepspeed"]["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills it in
    else:
        assert "fsdp" not in arguments and "deepspeed" not in arguments
    assert export_plan(plan, "torchrun").text == "--nnodes=1 --nproc_per_node=4"


# --- accuracy against the 2-process probe (slow: starts process groups) ------------------------

def _fits_on_2_processes(example: str, strategy: str, batch: int) -> bool:
    """`bsplan probe X --device cpu --memory-limit 300MiB --nproc 2 --strategy S --min-batch B --max-batch B`."""
    options = ProbeOptions(device="cpu", memory_limit=LIMIT, steps=2, min_batch=batch, max_batch=batch, nproc=2, strategy=strategy)
    return run_probe(EXAMPLES / example, options, Quiet()).max_batch == batch


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("example", ["mlp.py", "cnn.py", "transformer.py"])
def test_strategy_estimate_within_10_percent_of_the_2_process_probe(example: str, strategy: str) -> None:
    estimate = predict_for(measured(example), EstimateOptions(memory_bytes=LIMIT, layout=Layout(strategy, 2))).max_batch
    assert estimate is not None
    # The probe's max_batch P lies within 10% of the estimate exactly when the probe fits ceil(estimate / 1.1)
    # and not floor(estimate / 0.9) + 1 (as in test_estimate.py).
    assert _fits_on_2_processes(example, strategy, math.ceil(estimate / 1.1))
    assert not _fits_on_2_processes(example, strategy, math.floor(estimate / 0.9) + 1)
