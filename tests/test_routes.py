"""`bsplan routes`: the matrix, the direction each knob moves memory, the ranking, the JSON, the export,
and the per-device limit against `bsplan estimate`'s for the same setting."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, MODELS, bsplan

from bsplan.measure.estimate import measure_step, predict_measured, run_estimate
from bsplan.measure.flops import flops_per_sample
from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import run_probe
from bsplan.measure.routes import _estimates, _variant, run_routes
from bsplan.models.source import Callables, ModelSource
from bsplan.planning.catalog import find_gpu
from bsplan.planning.choices import Precision, Strategy
from bsplan.planning.errors import BadInput
from bsplan.planning.export import export_plan
from bsplan.planning.planner import make_plan
from bsplan.planning.prediction import EstimateOptions
from bsplan.planning.route_export import export_route
from bsplan.planning.routes import (
    OPTIMIZERS, PRECISIONS, STRATEGIES, Knobs, Route, RoutesOptions, RoutesResult, make_routes, matrix, parse_current,
)
from bsplan.planning.strategies import Layout
from bsplan.planning.units import parse_size

TINY = MODELS / "tiny.py"
BUDGET = "340KiB"  # tiny's AdamW replica does not fit with DDP's buckets; most other routes do, some below their cap
ROUTE_FIELDS = {
    "route", "precision", "activation_checkpointing", "optimizer", "strategy", "lora", "world_size", "fits", "max_micro_batch",
    "micro_batch", "accumulation_steps", "relative_compute", "communication_bytes", "communication_seconds", "changes", "miss",
    "sources", "rank", "predicted_step_seconds", "flops_per_sample", "compute_seconds",
}


class Quiet:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def started(self, batch: int) -> None:
        pass

    def finished(self, trial: object) -> None:
        pass

    def note(self, text: str) -> None:
        self.lines.append(text)


def _options(**given: object) -> RoutesOptions:
    values: dict[str, object] = dict(target=512, target_tokens=None, seq_len=None, gpus=4, nodes=1, gpu=None, memory=BUDGET,
                                     current=None, interconnect=None, lora=None, route=None, exporting=False)
    return RoutesOptions.from_cli(**{**values, **given})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny() -> tuple[RoutesResult, RoutesOptions, list[str]]:
    progress, options = Quiet(), _options()
    return run_routes(ModelSource(str(TINY)), options, progress), options, progress.lines


def _route(result: RoutesResult, precision: str, checkpointing: bool, optimizer: str, strategy: str) -> Route:
    return next(r for r in result.routes if (r.precision, r.activation_checkpointing, r.optimizer, r.strategy)
                == (precision, checkpointing, optimizer, strategy))


def test_the_matrix_has_every_combination_numbered_once(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, _, progress = tiny
    found = {(r.precision, r.activation_checkpointing, r.optimizer, r.strategy, r.lora) for r in result.routes}
    assert found == set(itertools.product(PRECISIONS, (False, True), OPTIMIZERS, STRATEGIES, (False,)))
    assert sorted(r.route for r in result.routes) == list(range(1, 73))
    assert [line for line in progress if line.startswith("route ")][2] == "route 3/18: fp32 + adafactor ..."
    with_lora = matrix(lora=True)
    assert len(with_lora) == 36 and {k.lora for k in with_lora} == {False, True} and with_lora[0] == Knobs()


def test_each_knob_moves_memory_the_documented_way(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, _, _ = tiny
    by_knobs: dict[tuple[object, ...], dict[str, int]] = {}
    for route in result.routes:
        if route.sources:  # measured
            knobs = (route.precision, route.activation_checkpointing, route.optimizer)
            by_knobs.setdefault(knobs, {})[route.strategy] = route.max_micro_batch or 0
    assert len(by_knobs) == 9  # tiny has no blocks to checkpoint: those nine settings are not measured
    for limits in by_knobs.values():
        assert limits["zero2"] >= limits["ddp"]  # sharding frees states, and DDP's buckets go
    options = EstimateOptions(memory_bytes=parse_size(BUDGET), max_batch=128)
    own, sgd = (measure_step(ModelSource(str(TINY), optimizer=name), options, Quiet(), compose=False)[0].breakdown
                for name in (None, "sgd"))
    assert sgd.optimizer_state_bytes == sgd.parameter_bytes  # SGD's momentum, one buffer
    assert own.optimizer_state_bytes - 2 * own.parameter_bytes == 16  # AdamW's two moments, and a step count per tensor


def test_fitting_routes_are_ranked_and_the_rest_listed_apart(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, _, _ = tiny
    fitting = [r for r in result.routes if r.fits]
    rest = result.routes[len(fitting):]
    assert fitting and rest and not any(r.fits for r in rest)
    assert [r.rank for r in fitting] == list(range(1, len(fitting) + 1)) and {r.rank for r in rest} == {None}
    key = [(round(r.relative_compute, 9), r.communication_bytes, r.changes, r.accumulation_steps) for r in fitting]
    assert key == sorted(key)
    assert result.recommended == fitting[0].route
    best = fitting[0]
    # bf16 weights halve the modelled compute, as autocast does, and their bf16 gradients halve the bytes moved
    assert (best.precision, best.strategy, best.relative_compute) == ("mixed", "zero2", 0.5)
    autocast = _route(result, "bf16", False, "own", "zero2")
    assert autocast.relative_compute == 0.5 and autocast.communication_bytes > best.communication_bytes
    assert best.micro_batch * best.accumulation_steps * best.world_size == 512 and best.micro_batch <= best.max_micro_batch
    ddp = _route(result, "fp32", False, "own", "ddp")
    assert not ddp.fits and ddp.miss.startswith("batch 1 needs 493 KiB of 340 KiB")
    checkpointed = _route(result, "fp32", True, "own", "ddp")
    assert checkpointed.miss.startswith("not measured: --gradient-checkpointing is not supported")


def test_changes_and_cost_count_from_the_current_setup(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, _, _ = tiny
    zero2 = _route(result, "bf16", True, "sgd", "zero2")
    assert zero2.changes == 4 and zero2.relative_compute == pytest.approx(2 / 3)
    knobs, strategy = parse_current("bf16,checkpointing,zero2", lora=False)
    assert (knobs, strategy) == (Knobs(Precision.bf16, True), Strategy.zero2) and knobs.compute(None) == pytest.approx(2 / 3)
    assert knobs.compute(find_gpu("v100 sxm2")) == pytest.approx(4 / 3)  # no bf16 tensor cores: bf16 gains nothing
    ddp, fsdp = (_route(result, "fp32", False, "sgd", s) for s in ("ddp", "fsdp"))
    assert fsdp.communication_bytes == 1.5 * ddp.communication_bytes  # ZeRO section 7: 3 against 2 x
    assert ddp.communication_seconds is None  # no bandwidth for a --memory budget


def test_bandwidth_from_the_catalogue_or_the_option() -> None:
    on = dict(memory=None, gpu="h100", target=64)
    assert _options(**on).bandwidth()[0] == 450  # 900 GB/s both ways: half each way
    assert _options(**on, nodes=2, gpus=8).bandwidth()[0] is None  # NVLink is within a node
    assert _options(**on, interconnect=100.0).bandwidth()[0] == 100
    assert find_gpu("l4").nvlink_gb_per_s is None


def test_json_has_the_documented_fields(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, _, _ = tiny
    data = json.loads(json.dumps(result.to_dict()))
    assert {"schema", "routes", "recommended", "target", "world_size", "device", "notes", "model", "current"} <= set(data)
    assert (data["schema"], data["target"], data["world_size"], data["recommended"]) == ("bsplan.routes/1", 512, 4, result.recommended)
    for route in data["routes"]:
        assert set(route) == ROUTE_FIELDS and route["predicted_step_seconds"] is None
    measured = next(r for r in data["routes"] if r["fits"])
    assert measured["sources"]["max_micro_batch"] == "traced+arithmetic" and measured["sources"]["relative_compute"] == "traced flops+modelled"
    adafactor = next(r for r in data["routes"] if r["optimizer"] == "adafactor" and r["sources"])
    assert adafactor["sources"]["max_micro_batch"] == "traced+arithmetic"  # the values its step reads are answered in the trace
    assert any(note.startswith("measured:") for note in data["notes"]) and any("modelled" in note for note in data["notes"])


def test_deepspeed_export_is_the_chosen_route(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, options, _ = tiny
    exported, _ = export_route(result, options, "deepspeed")
    best = next(r for r in result.routes if r.route == result.recommended)
    config = json.loads(exported.text)
    assert config["bf16"] == {"enabled": True} and config["zero_optimization"] == {"stage": 2}
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (
        512, best.micro_batch, best.accumulation_steps)
    fp32_sgd = _route(result, "fp32", False, "sgd", "zero1")
    exported, _ = export_route(result, replace(options, route=fp32_sgd.route), "hf")
    arguments = json.loads(exported.text)
    assert "bf16" not in arguments and arguments["deepspeed"]["zero_optimization"] == {"stage": 1}
    assert any("torch.optim.SGD" in note for note in exported.notes)
    missing = _route(result, "fp32", False, "own", "ddp")
    with pytest.raises(BadInput, match="does not fit"):
        export_route(result, replace(options, route=missing.route), "deepspeed")


def test_on_a_gpu_each_route_has_a_step_time_from_its_counted_flops() -> None:
    """tiny is Linear(64, 256), ReLU, Linear(256, 8): 2 FLOPs a multiply-add, forward 2 x (64 x 256 +
    256 x 8) per sample, backward both weight gradients and the second layer's input gradient (the
    first layer's input needs none). At the H100's 989 bf16 TFLOP/s (half for fp32), a device's share
    of 512 samples on 4, plus what it sends at half its NVLink's 900 GB/s."""
    forward = 2 * (64 * 256 + 256 * 8)
    flops = forward + 2 * 64 * 256 + 2 * 2 * 256 * 8
    result = run_routes(ModelSource(str(TINY)), _options(memory=None, gpu="h100"), Quiet())
    fitting = [r for r in result.routes if r.fits]
    assert fitting and all(r.flops_per_sample == flops for r in result.routes if r.sources)
    for route in fitting:
        peak = 989e12 if route.precision in ("bf16", "mixed") else 989e12 / 2
        assert route.compute_seconds == pytest.approx(128 * flops / peak)
        assert route.predicted_step_seconds == pytest.approx(route.compute_seconds + route.communication_bytes / 450e9)
    assert [r.predicted_step_seconds for r in fitting] == sorted(r.predicted_step_seconds for r in fitting)  # ranked by it
    assert any("predicted_step_seconds: a device's share of the traced FLOPs" in note for note in result.notes)
    across = make_routes(_options(memory=None, gpu="h100", nodes=2, gpus=2),  # no bandwidth across nodes: no step times
                         [(Knobs(), _estimates(ModelSource(str(TINY)), Knobs(), _options(memory=None, gpu="h100", nodes=2, gpus=2),
                                               Quiet()), flops)])
    assert all(r.predicted_step_seconds is None and "predicted_step_seconds" not in r.sources for r in across.routes)
    assert any("not for every route (no interconnect bandwidth is known)" in note for note in across.notes)


class _Attention(torch.nn.Module):
    """One projection (16 x 16) and fused attention over 2 heads of 8 tokens of 16: what a CPU trace
    runs as the CPU's flash attention, which torch's counter has no formula of its own for."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(x)
        return torch.nn.functional.scaled_dot_product_attention(hidden, hidden, hidden).sum()


def test_fused_attention_is_counted_in_a_step_s_flops() -> None:
    """Per sample: the projection 2 x 16 x 16 x 16 rows forward and again for its weight's gradient;
    attention's two products of 2 x 2 x 8 x 8 x 16 forward, five backward (the scores recomputed)."""
    source = ModelSource("attention", callables=Callables(_Attention, lambda size: torch.randn(size, 2, 8, 16),
                                                           lambda model, batch: model(batch), None))
    product = 2 * 2 * 8 * 8 * 16
    assert flops_per_sample(source) == 2 * (2 * 16 * 16 * 16) + (2 + 5) * product


def test_a_plan_from_a_saved_routes_result_takes_its_recommended_route(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, options, _ = tiny
    best = next(r for r in result.routes if r.route == result.recommended)
    saved = json.loads(json.dumps(result.to_dict()))
    plan = make_plan(replace(options.plan, probe_result=saved, global_batch=1024))
    assert (plan.limit.micro_batch, plan.limit.strategy, plan.strategy) == (best.max_micro_batch, best.strategy, best.strategy)
    assert plan.micro_batch * plan.accumulation_steps * 4 == 1024 and plan.micro_batch <= best.max_micro_batch
    assert any(f"(route {best.route})" in note and "with no headroom" in note for note in plan.notes)
    config = json.loads(export_plan(plan, "deepspeed").text)  # the route's knobs, as `routes --format deepspeed` exports them
    assert config["bf16"] == {"enabled": True} and config["zero_optimization"] == {"stage": 2}
    assert json.loads(export_plan(plan, "hf").text)["deepspeed"]["bf16"] == {"enabled": "auto"}  # mixed under ZeRO: DeepSpeed's bf16
    recipe = dict(base_lr=1e-3, base_batch=512, global_batch=512)
    sgd, adafactor = (_route(result, "fp32", False, name, "zero2").route for name in ("sgd", "adafactor"))
    with_sgd = make_plan(replace(options.plan, probe_result=saved, route=sgd, **recipe))  # the optimizer the route was measured with
    assert with_sgd.optimizer == "sgd" and json.loads(export_plan(with_sgd, "deepspeed").text)["optimizer"]["type"] == "SGD"
    with_adafactor = export_plan(make_plan(replace(options.plan, probe_result=saved, route=adafactor, **recipe)), "deepspeed")
    assert "optimizer" not in json.loads(with_adafactor.text) and any("DeepSpeed has no Adafactor" in n for n in with_adafactor.notes)
    with pytest.raises(BadInput, match="not on 8 devices"):  # a sharded route's limit holds at its own world size only
        make_plan(replace(options.plan, probe_result=saved, gpus_per_node=8))
    with pytest.raises(BadInput, match="--strategy recomputes a probe's limit from its memory line"):
        make_plan(replace(options.plan, probe_result=saved, strategy="zero1"))


def test_with_trace_wrappers_ddp_and_fsdp_routes_are_what_estimate_traces_on_a_fake_group() -> None:
    options = _options(gpus=2, trace_wrappers=True)
    estimates = _estimates(ModelSource(str(TINY)), Knobs(), options, Quiet())  # the model's own setup
    result = make_routes(options, [(Knobs(), estimates, None)])
    for strategy in (Strategy.ddp, Strategy.fsdp):
        layout = Layout(strategy, 2)
        traced = run_estimate(ModelSource(str(TINY)), EstimateOptions(memory_bytes=parse_size(BUDGET), max_batch=256, layout=layout),
                              Quiet())
        route = _route(result, "fp32", False, "own", strategy)
        assert route.max_micro_batch == traced.max_batch and route.sources["max_micro_batch"] == "traced"
    assert _route(result, "fp32", False, "own", "zero2").sources["max_micro_batch"] == "traced+arithmetic"
    arithmetic = make_routes(replace(options, trace_wrappers=False), [(Knobs(), _estimates(ModelSource(str(TINY)), Knobs(),
                                                                                              replace(options, trace_wrappers=False), Quiet()), None)])
    for strategy in (Strategy.ddp, Strategy.fsdp):  # what a device sends is the whole replica's, however its limit was measured
        assert _route(result, "fp32", False, "own", strategy).communication_bytes == _route(arithmetic, "fp32", False, "own",
                                                                                             strategy).communication_bytes


def test_a_wrapper_that_cannot_be_traced_keeps_the_arithmetic_and_says_so() -> None:
    """torch's Adafactor steps FSDP's sharded parameters in place in a way the fake tensors refuse: its
    FSDP routes keep the arithmetic on one replica (never real steps of a whole replica instead)."""
    source, knobs = _variant(ModelSource(str(TINY)), Knobs(optimizer="adafactor")), Knobs(optimizer="adafactor")
    traced = _estimates(source, knobs, _options(gpus=2, trace_wrappers=True), Quiet())
    arithmetic = _estimates(source, knobs, _options(gpus=2), Quiet())
    assert traced[Strategy.fsdp].max_batch == arithmetic[Strategy.fsdp].max_batch and traced[Strategy.fsdp].method == "trace"
    assert any(note.startswith("the step could not be traced under fsdp") for note in traced[Strategy.fsdp].notes)


def test_lora_compute_is_said_to_be_full_fine_tuning_s_only_where_its_flops_were_not_counted() -> None:
    options = _options(lora="r=8")
    estimates = _estimates(ModelSource(str(TINY)), Knobs(), _options(), Quiet())
    lora = "LoRA's compute is counted as full fine-tuning's"
    for flops, said in ((None, True), (5e4, False)):  # counted FLOPs leave out the gradients LoRA skips
        notes = make_routes(options, [(Knobs(), estimates, 7.8e4), (Knobs(lora=True), estimates, flops)]).notes
        assert any(note.startswith(lora) for note in notes) == said


def test_a_route_limit_is_the_estimate_of_its_setting(tiny: tuple[RoutesResult, RoutesOptions, list[str]]) -> None:
    result, _, _ = tiny
    route = _route(result, "fp32", False, "sgd", "zero2")
    options = EstimateOptions(memory_bytes=parse_size(BUDGET), max_batch=128, layout=Layout(Strategy.zero2, 4))
    estimate = run_estimate(ModelSource(str(TINY), optimizer="sgd"), options, Quiet())
    assert route.max_micro_batch == estimate.max_batch < 128


@pytest.mark.parametrize("given, sentence", [
    ({"target": None}, "give the global batch once"),
    ({"target_tokens": "4K", "seq_len": 8}, "give the global batch once"),
    ({"route": 73, "exporting": True}, "--route 73 is not a route: they are numbered 1 to 72"),
    ({"route": 3}, "--route K picks the route --format exports"),
    ({"memory": None}, "give --gpu NAME"),
    ({"target": 510}, "cannot split global batch 510 exactly"),
    ({"current": "bf16,fp32"}, "sets the precision twice"),
    ({"current": "lora"}, "--current lora needs --lora"),
])
def test_bad_input_is_one_sentence(given: dict[str, object], sentence: str) -> None:
    with pytest.raises(BadInput, match=sentence.replace("(", r"\(")):
        _options(**given)


@pytest.mark.slow
def test_the_command_matches_estimate_and_refuses_bad_input(tmp_path: Path) -> None:
    run = bsplan("routes", str(TINY), "--memory", BUDGET, "--target", "512", "--gpus", "4", "--json", "--output", str(tmp_path / "r.json"),
                 "--noise-scale", "100")
    assert run.code == 0, run.stderr
    noise = run.json()["noise"]  # 512 is 5.12 noise scales: the largest efficient target 4 devices split is 200
    assert (noise["noise_scale"], noise["examples_ratio"], noise["efficient_target"]) == (100, 6.12, 200)
    assert any("route --target 200 instead" in note for note in run.json()["notes"])
    assert "route 3/18: fp32 + adafactor ..." in run.stderr
    route = next(r for r in run.json()["routes"] if r["route"] == 2)  # fp32, the model's own AdamW, zero1
    estimate = bsplan("estimate", str(TINY), "--memory", BUDGET, "--strategy", "zero1", "--gpus", "4", "--max-batch", "128", "--json")
    assert route["max_micro_batch"] == estimate.json()["max_batch"] < 128
    assert json.loads((tmp_path / "r.json").read_text())["recommended"] == run.json()["recommended"]
    bad = bsplan("routes", str(TINY), "--memory", BUDGET, "--gpus", "4", "--format", "deepspeed", "--target", "512", "--route", "0")
    assert bad.code == 2 and bad.stderr.strip().splitlines() == ["error: --route 0 is not a route: they are numbered 1 to 72"]


def test_each_fitting_route_is_the_micro_batch_a_real_probe_finds() -> None:
    """On one device ZeRO-1 keeps the whole replica, so each zero1 route's limit is what a real probe of
    the same knobs under the counted limit finds: every setting of precision, checkpointing and
    optimizer, on a model with repeated blocks (the other strategies move it by arithmetic, tested above
    against `bsplan estimate`, whose traced DDP and FSDP are checked against real ranks in test_trace.py)."""
    source = ModelSource(str(MODELS / "seq_lm.py"), seq_len=16)
    result = run_routes(source, _options(gpus=1, target=128, memory="3MiB"), Quiet())
    confirmed = 0
    for route in (r for r in result.routes if r.strategy == Strategy.zero1):
        knobs = Knobs(route.precision, route.activation_checkpointing, route.optimizer, route.lora)
        options = ProbeOptions(device="cpu", memory_limit=parse_size("3MiB"), precision=route.precision, max_batch=128, steps=2)
        probed = run_probe(_variant(source, knobs), options, Quiet())
        assert route.max_micro_batch == probed.max_batch < 128, knobs.label()
        confirmed += 1
    assert confirmed == len(matrix(False)) == 18


@pytest.mark.parametrize("example", ["mlp.py", "cnn.py", "transformer.py"])
def test_each_knob_moves_the_limit_the_documented_way_on_every_example(example: str) -> None:
    """bf16 autocast and checkpointing never lower the per-device limit, under any strategy; nor does a
    lighter optimizer (SGD's one state against AdamW's two, Adafactor's factored rows and columns) where
    the optimizer state is whole on a device (DDP), nor ZeRO-1 against DDP (docs/routes.md)."""
    base = ModelSource(str(EXAMPLES / example))
    options = EstimateOptions(memory_bytes=parse_size("300MiB"), max_batch=1 << 20)

    def limits(source: ModelSource, precision: str = "fp32") -> dict[Strategy, int | None]:
        chosen = replace(options, precision=precision)
        measurement, traced, _ = measure_step(source, chosen, Quiet(), compose=False)
        return {s: predict_measured(measurement, traced, replace(chosen, layout=Layout(s, 4))).max_batch for s in STRATEGIES}

    own, bf16 = limits(base), limits(base, "bf16")
    sgd, adafactor = limits(replace(base, optimizer="sgd")), limits(replace(base, optimizer="adafactor"))
    assert all(own[strategy] <= bf16[strategy] for strategy in STRATEGIES) and bf16[Strategy.ddp] > own[Strategy.ddp]
    ddp = Strategy.ddp
    assert adafactor[ddp] >= sgd[ddp] >= own[ddp]  # the cnn's own optimizer is SGD with momentum: equal there
    assert own[ddp] <= own[Strategy.zero1] and bf16[ddp] <= bf16[Strategy.zero1]
    if example == "transformer.py":  # the only example with repeated blocks to checkpoint
        checkpointed = limits(replace(base, gradient_checkpointing=True))
        assert all(checkpointed[s] > own[s] for s in STRATEGIES)
