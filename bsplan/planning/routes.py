"""`bsplan routes`: every way to reach a global batch on N devices, ranked. Plain data and arithmetic, no torch.

A route is one setting of each knob that moves a step's memory or time: precision, activation
checkpointing, optimizer, data-parallel strategy and, with --lora, LoRA. Its memory is measured
(measure/routes.py traces one replica per setting of the knobs other than the strategy, and each
strategy's per-device limit is `bsplan estimate`'s arithmetic on that trace). Its time per optimizer
step is modelled here from published ratios, since nothing is timed: docs/routes.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence, Union

from bsplan.planning import checks
from bsplan.planning.catalog import GpuModel
from bsplan.planning.choices import Precision, Strategy
from bsplan.planning.decomposition import decompose
from bsplan.planning.errors import BadInput
from bsplan.planning.noise import EFFICIENT_MULTIPLE, NoiseEfficiency, noise_efficiency
from bsplan.planning.plan import PlanOptions
from bsplan.planning.prediction import EstimateOptions
from bsplan.planning.record import Record
from bsplan.planning.results import ROUTES_SCHEMA, DeviceInfo, EstimateResult, ModelInfo
from bsplan.planning.strategies import ZERO_PAPER
from bsplan.planning.units import format_bytes

# bf16: autocast over fp32 weights, gradients and optimizer state; mixed: bf16 weights and gradients with fp32
# master weights and optimizer state (models/knobs.py MasterWeights), as DeepSpeed's bf16 keeps them.
PRECISIONS = (Precision.fp32, Precision.bf16, Precision.mixed)
OPTIMIZERS = ("own", "sgd", "adafactor")  # own: the model file's build_optimizer, else AdamW (measure/workload.py)
STRATEGIES = (Strategy.ddp, Strategy.zero1, Strategy.zero2, Strategy.fsdp)
TRACED_WRAPPERS = (Strategy.ddp, Strategy.fsdp)  # what --trace-wrappers traces on a fake process group (zero1/2 have no wrapper)
# Checkpointing recomputes the forward pass in backward: one more forward per step, a third of forward and
# backward together, the backward costing about two forwards (Chen et al. 2016, arXiv:1604.06174;
# Korthikanti et al. 2022, arXiv:2205.05198).
RECOMPUTE = 1 / 3
# Dense bf16 tensor-core throughput is twice TF32's: A100 312 against 156 TFLOP/s, H100 SXM 989 against
# 495 (NVIDIA's datasheets, docs/routes.md). Against fp32 matmuls without TF32 the gain is larger.
BF16_SPEEDUP = 2.0
# What each device sends per optimizer step, in multiples of a replica's (parameter, gradient) bytes:
# ZERO_PAPER, section 7. DDP's all-reduce and ZeRO-1/2's reduce-scatter and all-gather move 2 x the
# gradients; ZeRO-3 and FSDP gather the parameters in forward and again in backward, and reduce-scatter
# the gradients: 3 x.
COMMUNICATED = {Strategy.ddp: (0, 2), Strategy.zero1: (0, 2), Strategy.zero2: (0, 2), Strategy.fsdp: (2, 1)}


@dataclass(frozen=True)
class Knobs:
    """A route but its strategy: what one trace measures (the strategy is arithmetic on the trace)."""

    precision: Precision = Precision.fp32
    activation_checkpointing: bool = False
    optimizer: str = "own"
    lora: bool = False

    def label(self) -> str:
        parts = [str(self.precision), "checkpointing" if self.activation_checkpointing else "",
                 "own optimizer" if self.optimizer == "own" else self.optimizer, "lora" if self.lora else ""]
        return " + ".join(part for part in parts if part)

    def speedup(self, gpu: GpuModel | None) -> float:
        """Against fp32 (TF32) matmuls: bf16 gains nothing on a GPU without bf16 tensor cores."""
        half = self.precision in (Precision.bf16, Precision.mixed)
        return BF16_SPEEDUP if half and (gpu is None or gpu.bf16_tflops) else 1.0

    def compute(self, gpu: GpuModel | None, flops: float | None = None) -> float:
        """Compute per sample at fp32 speed: the counted FLOPs, else in forward-and-backward passes by
        the published ratio for checkpointing (LoRA's skipped weight gradients are then not counted)."""
        return (1 + RECOMPUTE * self.activation_checkpointing if flops is None else flops) / self.speedup(gpu)


def matrix(lora: bool) -> tuple[Knobs, ...]:
    """Every setting of the knobs a trace measures, the model's own setup first."""
    return tuple(Knobs(precision, checkpointing, optimizer, adapters) for precision in PRECISIONS
                 for checkpointing in (False, True) for optimizer in OPTIMIZERS for adapters in (False, True)[: 1 + lora])


_KNOBS = {**{str(p): ("precision", p) for p in PRECISIONS}, "checkpointing": ("activation_checkpointing", True),
          **{o: ("optimizer", o) for o in OPTIMIZERS}, **{str(s): ("strategy", s) for s in STRATEGIES}, "lora": ("lora", True)}


def parse_current(text: str | None, lora: bool) -> tuple[Knobs, Strategy]:
    """--current bf16,checkpointing,zero2: the setup simplicity counts changes from; what it leaves out
    is the model's own (fp32, no checkpointing, its optimizer, ddp, no LoRA)."""
    chosen: dict[str, Any] = {}
    for token in [] if text is None else [part.strip() for part in text.split(",")]:
        if token not in _KNOBS:
            raise BadInput(f"--current {text}: {token!r} is none of {', '.join(_KNOBS)}")
        field, value = _KNOBS[token]
        if field in chosen:
            raise BadInput(f"--current {text} sets the {field.replace('_', ' ')} twice")
        chosen[field] = value
    if chosen.get("lora") and not lora:
        raise BadInput("--current lora needs --lora r=N: the adapters the LoRA routes train")
    strategy = chosen.pop("strategy", Strategy.ddp)
    return Knobs(**chosen), strategy


@dataclass(frozen=True)
class RoutesOptions:
    """What to route: the target on the devices (as plan takes it), the budget per device (as estimate
    takes it, capped at a device's share of the target), the current setup, the interconnect."""

    plan: PlanOptions
    estimate: EstimateOptions
    current: Knobs = Knobs()
    current_strategy: Strategy = Strategy.ddp
    lora: str | None = None  # --lora: the adapters the LoRA routes train (r=16,alpha=32); None: no LoRA routes
    interconnect_gb_per_s: float | None = None  # what each GPU sends at, one direction (nccl-tests' busbw)
    route: int | None = None  # --route K: export route K instead of the recommended one
    noise: NoiseEfficiency | None = None  # --noise-scale: what the target costs in steps and examples against it
    trace_wrappers: bool = False  # --trace-wrappers: DDP and FSDP traced on a fake process group, not arithmetic

    @classmethod
    def from_cli(cls, *, target: int | None, target_tokens: str | None, seq_len: int | None, gpus: int, nodes: int,
                 gpu: str | None, memory: str | None, current: str | None, interconnect: float | None, lora: str | None,
                 route: int | None, exporting: bool, noise_scale: str | None = None, trace_wrappers: bool = False) -> RoutesOptions:
        """The options, each bad one refused with one sentence before anything is traced."""
        plan = PlanOptions.from_cli(target=target, target_tokens=target_tokens, seq_len=seq_len, gpus_per_node=gpus, nodes=nodes)
        decompose(plan.global_batch, plan.world_size, None)  # a target the devices cannot share is refused here
        share = plan.global_batch // plan.world_size  # no micro-batch is larger: the trace stops there
        estimate = EstimateOptions.from_cli(model_given=True, gpu=gpu, memory=memory, cuda_context=None, max_batch=share,
                                            precision=Precision.fp32)
        checks.positive("--interconnect", interconnect)
        count = len(matrix(lora is not None)) * len(STRATEGIES)
        if route is not None and not exporting:
            raise BadInput("--route K picks the route --format exports: give --format deepspeed, hf, lightning or torchrun")
        if route is not None and not 1 <= route <= count:
            raise BadInput(f"--route {route} is not a route: they are numbered 1 to {count}")
        knobs, strategy = parse_current(current, lora is not None)
        return cls(plan, estimate, knobs, strategy, lora, interconnect, route, noise_efficiency(noise_scale), trace_wrappers)

    def bandwidth(self) -> tuple[float | None, str]:
        """GB/s each device sends at, and where that comes from (or why it is unknown)."""
        gpu = self.estimate.gpu
        if self.interconnect_gb_per_s is not None:
            return self.interconnect_gb_per_s, f"--interconnect {self.interconnect_gb_per_s:g} GB/s"
        if gpu is None or gpu.nvlink_gb_per_s is None:
            return None, "no interconnect bandwidth is known (give --interconnect GB/s, e.g. nccl-tests' busbw)"
        if self.plan.nodes > 1:
            return None, f"{gpu.key}'s NVLink joins the GPUs of one node only: give --interconnect GB/s for {self.plan.nodes} nodes"
        return gpu.nvlink_gb_per_s / 2, f"{gpu.key}'s NVLink, {gpu.nvlink_gb_per_s:g} GB/s both directions, half each way"


@dataclass(frozen=True)
class Route(Record):
    """One route: its knobs, the per-device limit measured for it, the split of the target, the modelled cost."""

    route: int  # its number in the matrix, the same from run to run (--route K)
    precision: Precision
    activation_checkpointing: bool
    optimizer: str
    strategy: Strategy
    lora: bool
    world_size: int
    fits: bool
    max_micro_batch: int | None  # per device, capped at the device's share of the target; None: batch 1 does not fit
    micro_batch: int | None
    accumulation_steps: int | None
    relative_compute: float  # compute per optimizer step against the current setup's (1.0)
    flops_per_sample: float | None  # forward and backward, counted on a traced step; None: not counted
    compute_seconds: float | None  # those FLOPs of a device's share at the --gpu's dense peak; None: no speed known
    communication_bytes: int | None  # what each device sends per optimizer step; None: not measured
    communication_seconds: float | None  # those bytes at the interconnect's bandwidth; None: no bandwidth known
    changes: int  # knobs changed from the current setup
    miss: str | None  # why it does not fit
    sources: dict[str, str]  # how each number was obtained
    predicted_step_seconds: float | None = None  # compute_seconds + communication_seconds; None where either is unknown
    rank: int | None = None  # among the fitting routes, 1 the fastest

    @property
    def label(self) -> str:
        return f"{Knobs(self.precision, self.activation_checkpointing, self.optimizer, self.lora).label()} + {self.strategy}"


@dataclass(frozen=True)
class RoutesResult(Record):
    model: ModelInfo  # as the model's own setup traced
    device: DeviceInfo
    target: int  # the global batch in samples
    nodes: int
    gpus_per_node: int
    current: dict[str, Any]
    interconnect_gb_per_s: float | None  # one direction, what communication_seconds divide by
    lora: str | None  # the adapters the LoRA routes train (--lora), None without LoRA routes
    noise: dict[str, Any] | None  # --noise-scale: as a plan's "noise" field (docs/plan.md), None without it
    routes: tuple[Route, ...]  # the fitting ones ranked, fastest first, then the others by number
    notes: tuple[str, ...]

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def recommended(self) -> int | None:
        return next((route.route for route in self.routes if route.fits), None)

    def document(self) -> dict[str, Any]:
        return {"schema": ROUTES_SCHEMA, "recommended": self.recommended, "world_size": self.world_size, **super().document(),
                "routes": [route.to_dict() for route in self.routes]}


# What a variant's measurement gave: one estimate per strategy, or why it could not be measured; and its
# FLOPs per sample (None: not counted).
Measured = tuple[Knobs, Union[dict[Strategy, EstimateResult], str], Union[float, None]]


def make_routes(options: RoutesOptions, measured: Sequence[Measured]) -> RoutesResult:
    """Every route from the variants' estimates: its split, its modelled cost, ranked."""
    plan, gpu, current = options.plan, options.estimate.gpu, _knob_fields(options.current)
    bandwidth, where = options.bandwidth()
    counted = {(k.activation_checkpointing, k.lora): flops for k, _, flops in measured if flops is not None}
    now = counted.get((options.current.activation_checkpointing, options.current.lora))
    routes = []
    for index, (knobs, estimates, flops) in enumerate(measured):
        fields = _knob_fields(knobs)
        changes = sum(value != current[name] for name, value in fields.items())
        relative = (knobs.compute(gpu) / options.current.compute(gpu) if flops is None or now is None
                    else knobs.compute(gpu, flops) / options.current.compute(gpu, now))
        seconds = None if flops is None or gpu is None or gpu.bf16_tflops is None else (
            plan.global_batch / plan.world_size * flops / (gpu.bf16_tflops * 1e12 / BF16_SPEEDUP * knobs.speedup(gpu)))
        for offset, strategy in enumerate(STRATEGIES):
            routes.append(_route(estimates, options, bandwidth, route=index * len(STRATEGIES) + offset + 1, strategy=strategy,
                                 world_size=plan.world_size, relative_compute=relative, flops_per_sample=flops,
                                 compute_seconds=seconds, changes=changes + (strategy != options.current_strategy), **fields))
    own = measured[0][1]  # the model's own setup: measured, or the whole command failed
    assert not isinstance(own, str)
    timed = _timed(routes)
    return RoutesResult(own[Strategy.ddp].model, own[Strategy.ddp].device, plan.global_batch, plan.nodes, plan.gpus_per_node,
                        {**current, "strategy": options.current_strategy}, bandwidth, options.lora,
                        None if options.noise is None else options.noise.at(plan.global_batch, plan.world_size),
                        _ranked(routes, timed), _notes(options, where, measured, timed))


def _knob_fields(knobs: Knobs) -> dict[str, Any]:
    return {"precision": knobs.precision, "activation_checkpointing": knobs.activation_checkpointing,
            "optimizer": knobs.optimizer, "lora": knobs.lora}


def _route(estimates: dict[Strategy, EstimateResult] | str, options: RoutesOptions, bandwidth: float | None,
           **fields: Any) -> Route:
    """A route from its setting's estimates (or the reason they are missing): the per-device limit, the
    split of the target, and the bytes it sends per step and in what time."""
    if isinstance(estimates, str):
        return Route(**fields, fits=False, max_micro_batch=None, micro_batch=None, accumulation_steps=None,
                     communication_bytes=None, communication_seconds=None, miss=estimates, sources={})
    world, estimate = fields["world_size"], estimates[fields["strategy"]]
    parameters, gradients = COMMUNICATED[fields["strategy"]]
    replica = estimates[Strategy.zero1].breakdown  # zero1 is always arithmetic on the whole replica's trace
    sent = 0 if world == 1 else round(parameters * replica.parameter_bytes + gradients * replica.gradient_bytes)
    sending_seconds = 0.0 if sent == 0 else None if bandwidth is None else sent / (bandwidth * 1e9)
    computing = fields["compute_seconds"]
    unknown = computing is None or sending_seconds is None or estimate.max_batch is None  # a route that does not fit has no step
    predicted = None if unknown else computing + sending_seconds  # type: ignore[operator]
    traced = any(note.startswith(f"{fields['strategy']} traced on a fake process group") for note in estimate.notes)
    how = {"max_micro_batch": "traced" if traced else ("traced" if estimate.method == "trace" else "cpu-steps") + "+arithmetic",
           "model_states_per_device": "traced" if traced else "arithmetic",
           "relative_compute": "modelled" if fields["flops_per_sample"] is None else "traced flops+modelled",
           "flops_per_sample": "traced", "compute_seconds": "modelled", "communication_bytes": "modelled",
           "communication_seconds": "modelled", "predicted_step_seconds": "modelled"}
    known = {"flops_per_sample": fields["flops_per_sample"], "compute_seconds": computing, "communication_seconds": sending_seconds,
             "predicted_step_seconds": predicted}
    sending = dict(communication_bytes=sent, communication_seconds=sending_seconds,
                   sources={name: way for name, way in how.items() if known.get(name, True) is not None})
    most = estimate.max_batch
    if most is None:
        needs = estimate.fit.peak(1) + estimate.overheads.total_bytes
        miss = f"batch 1 needs {format_bytes(needs)} of {format_bytes(estimate.device.total_bytes)} per device"
        return Route(**fields, **sending, fits=False, max_micro_batch=None, micro_batch=None, accumulation_steps=None, miss=miss)
    split = decompose(options.plan.global_batch, world, most).choice
    return Route(**fields, **sending, fits=True, max_micro_batch=most, micro_batch=split.micro_batch,
                 accumulation_steps=split.accumulation_steps, miss=None, predicted_step_seconds=predicted)


def _timed(routes: Sequence[Route]) -> bool:
    """Whether every fitting route has a predicted step time (a --gpu with a known peak and interconnect,
    FLOPs counted), so that the routes rank by it."""
    fitting = [route for route in routes if route.fits]
    return bool(fitting) and all(route.predicted_step_seconds is not None for route in fitting)


def _ranked(routes: list[Route], timed: bool) -> tuple[Route, ...]:
    """Fitting routes by predicted step time where _timed; else by compute, then bytes moved (in
    different units while no speed is known); then fewest changes, then fewest accumulation steps."""
    fitting = [r for r in routes if r.fits]

    def cost(route: Route) -> tuple[float, ...]:
        if timed:
            return (round(route.predicted_step_seconds or 0.0, 12),)
        return (round(route.relative_compute, 9), route.communication_bytes or 0)

    fitting.sort(key=lambda r: (*cost(r), r.changes, r.accumulation_steps or 0, r.route))
    return tuple(replace(route, rank=rank) for rank, route in enumerate(fitting, 1)) + tuple(r for r in routes if not r.fits)


def _notes(options: RoutesOptions, bandwidth: str, measured: Sequence[Measured], timed: bool) -> tuple[str, ...]:
    plan = options.plan
    wrappers = ("; ddp and fsdp traced themselves on a fake process group of the world size (--trace-wrappers)"
                if options.trace_wrappers and plan.world_size > 1 else
                "; `bsplan estimate --strategy ddp|fsdp` (or --trace-wrappers) traces the real wrapper instead, and may differ: "
                "check an fsdp route so before training with it (docs/routes.md)")
    notes = [
        "measured: each route's max_micro_batch, from its knobs' training step traced once on one replica against the "
        "budget (bsplan estimate's trace engine) and each strategy's model states per device by arithmetic on it "
        f"(docs/strategies.md){wrappers}",
        f"max_micro_batch is capped at a device's share of the target, {plan.global_batch // plan.world_size}: no split uses more",
        "modelled, not measured: relative_compute (the traced step's FLOPs, else checkpointing 4/3; bf16 and mixed 1/2 of "
        f"fp32) and the bytes each strategy moves per step ({ZERO_PAPER}, section 7) (docs/routes.md)",
        f"communication_seconds: {bandwidth}",
        _timing(options, timed),
    ]
    if options.noise is not None:
        notes.append(_noise_note(options.noise, plan.global_batch, plan.world_size))
    if any(knobs.lora and flops is None for knobs, estimates, flops in measured if not isinstance(estimates, str)):
        notes.append("LoRA's compute is counted as full fine-tuning's where its FLOPs were not counted: the frozen weights' "
                     "gradients it skips are not modelled there")
    gpu = options.estimate.gpu
    if gpu is not None and gpu.bf16_tflops is None:
        notes.append(f"{gpu.key} has no bf16 tensor cores: bf16 and mixed routes are counted as fast as fp32")
    reasons: dict[str, list[str]] = {}  # each reason a setting was not traced, said once for all it stopped
    for knobs, estimates, _ in measured:
        texts = [estimates] if isinstance(estimates, str) else dict.fromkeys(n for e in estimates.values() for n in e.notes)
        for text in texts:
            if text.startswith(("the step could not be traced", "not measured")):
                reasons.setdefault(text, []).append(knobs.label())
    notes.extend(f"{'; '.join(labels)}: {text}" for text, labels in reasons.items())
    return tuple(notes)


def _noise_note(noise: NoiseEfficiency, target: int, world_size: int) -> str:
    """The target against the noise scale, as a plan says it: past EFFICIENT_MULTIPLE noise scales every
    route spends examples the steps it saves do not repay, and a smaller target is named."""
    said = f"noise scale {noise.describe(target)}"
    if target <= EFFICIENT_MULTIPLE * noise.noise_scale:
        return said
    efficient = noise.efficient_target(world_size)
    smaller = (f"route --target {efficient} instead, the largest efficient global batch these {world_size} devices split"
               if efficient is not None else f"even one sample per device ({world_size}) is beyond it")
    return (f"{said}: global batch {target} is {target / noise.noise_scale:.3g}x the noise scale, beyond "
            f"{EFFICIENT_MULTIPLE:g}x, so every route here needs {noise.examples_ratio(target):.3g}x the fewest examples; {smaller}")


def _timing(options: RoutesOptions, timed: bool) -> str:
    """What predicted_step_seconds is, or why not every route has one, and so what the ranking is by."""
    gpu, bandwidth = options.estimate.gpu, options.bandwidth()[0]
    if not timed:
        why = ("a --memory budget has no speed" if gpu is None else f"{gpu.key} has no bf16 tensor-core peak in the catalogue"
               if gpu.bf16_tflops is None else "no interconnect bandwidth is known" if bandwidth is None and options.plan.world_size > 1
               else "FLOPs were not counted for every setting, or no route fits")
        return f"predicted_step_seconds: not for every route ({why}): the ranking is by compute, then bytes moved, then fewest changes"
    assert gpu is not None and gpu.bf16_tflops is not None
    return (f"predicted_step_seconds: a device's share of the traced FLOPs at {gpu.key}'s dense peak ({gpu.bf16_tflops:g} "
            f"TFLOP/s bf16, half that for fp32 as TF32) plus communication_seconds after it: no kernel sustains the peak, "
            "and communication overlaps compute, so real steps differ both ways; the ranking is by it, then fewest changes")
