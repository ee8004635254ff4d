"""What a plan is: the options that ask for it (checked when made) and the plan itself, with the
records it is made of. The modules beside this one compute it: decomposition.py (the split),
limit.py (the per-device limit), comparison.py (--strategy auto), advice.py (the warnings) and
planner.py (the whole). Pure data: no torch, no terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsplan.planning import checks
from bsplan.planning.choices import Optimizer, PlanStrategy, ProbeLimit, Scaling, Strategy
from bsplan.planning.errors import BadInput
from bsplan.planning.noise import NoiseEfficiency, noise_efficiency
from bsplan.planning.record import Record
from bsplan.planning.saved import SavedProbe
from bsplan.planning.scaling import LearningRate, Schedule, Warmup
from bsplan.planning.units import parse_tokens

PLAN_SCHEMA = "bsplan.plan/1"


@dataclass(frozen=True)
class PlanOptions:
    """What to plan: the target, the devices, where the per-device limit comes from, the recipe."""

    global_batch: int
    gpus_per_node: int = 1
    nodes: int = 1
    max_micro: int | None = None
    probe_file: Path | None = None
    probe_result: dict[str, Any] | None = None  # a probe's or estimate's JSON document in memory (bsplan.plan(probe=...))
    route: int | None = None  # of a routes result: the route to plan with (None: its recommended one)
    use: ProbeLimit = ProbeLimit.recommended  # which of a probe's limits: recommended (keeps headroom) or max
    multiple_of: int = 1
    base_lr: float | None = None
    base_batch: int | None = None
    scaling: Scaling = Scaling.auto
    optimizer: Optimizer = Optimizer.adamw  # what `bsplan probe` trains with when the model file names none
    beta2: float = 0.999
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_ratio: float | None = None
    dataset_size: int | None = None
    epochs: float | None = None
    batchnorm: bool | None = None  # None: as the probe found, else False
    gpu: str | None = None  # a catalogue GPU: the limit is estimated for it from the probe's memory line
    strategy: PlanStrategy = PlanStrategy.none  # type: ignore[valid-type, attr-defined]  # recompute the limit for it; auto: compare them all
    bucket_view: bool = False  # DDP's gradient_as_bucket_view
    seq_len: int | None = None  # tokens per sample: --target-tokens and --dataset-tokens in samples, and a sweep's row
    target_tokens: int | None = None  # the global batch as asked in tokens (global_batch is it in samples)
    dataset_tokens: int | None = None  # the dataset as given in tokens (dataset_size is it in samples)
    noise: NoiseEfficiency | None = None  # --noise-scale: the gradient noise scale the global batch is weighed against

    @classmethod
    def from_cli(
        cls, *, target: int | None, target_tokens: str | int | None = None, seq_len: int | None = None,
        dataset_size: int | None = None, dataset_tokens: str | int | None = None, noise_scale: str | float | None = None,
        **rest: Any,
    ) -> PlanOptions:
        """The options of `bsplan plan`, with the global batch (and the dataset) given in samples or in
        tokens; tokens become whole samples of --seq-len here, so everything after plans in samples."""
        if (target is None) == (target_tokens is None):
            raise BadInput("give the global batch once: --target in samples, or --target-tokens in tokens with --seq-len")
        if dataset_size is not None and dataset_tokens is not None:
            raise BadInput("give the dataset once: --dataset-size in samples or --dataset-tokens in tokens, not both")
        tokens = None if target_tokens is None else parse_tokens(target_tokens, "--target-tokens")
        data_tokens = None if dataset_tokens is None else parse_tokens(dataset_tokens, "--dataset-tokens")
        checks.at_least("--seq-len", seq_len)
        for option, given in (("--target-tokens", tokens), ("--dataset-tokens", data_tokens)):
            if given is not None and seq_len is None:
                raise BadInput(f"{option} needs --seq-len, the tokens in one sample, to count it in samples")
        if tokens is not None and seq_len is not None:
            # Whole samples that split exactly over the devices (a token target is a size, not a count
            # to keep to the sample): make_plan notes the tokens per step this gives.
            unit = int(rest.get("gpus_per_node", 1)) * int(rest.get("nodes", 1)) * int(rest.get("multiple_of", 1))
            target = max(unit, tokens // seq_len // unit * unit)
        if data_tokens is not None and seq_len is not None:
            dataset_size = -(-data_tokens // seq_len)  # a last partial sample is a sample, as a last partial batch is a step
        assert target is not None
        return cls(target, seq_len=seq_len, target_tokens=tokens, dataset_size=dataset_size, dataset_tokens=data_tokens,
                   noise=noise_efficiency(noise_scale), **rest)

    def __post_init__(self) -> None:
        """Each choice made a member and each bad option refused with one sentence, before anything is computed."""
        for name, kind, option in (("use", ProbeLimit, "--use"), ("scaling", Scaling, "--scaling"),
                                   ("optimizer", Optimizer, "--optimizer"), ("strategy", PlanStrategy, "--strategy")):
            object.__setattr__(self, name, kind.parse(getattr(self, name), option))
        for option, value in (
            ("--target", self.global_batch), ("--gpus", self.gpus_per_node), ("--nodes", self.nodes),
            ("--max-micro", self.max_micro), ("--multiple-of", self.multiple_of), ("--base-batch", self.base_batch),
            ("--dataset-size", self.dataset_size), ("--seq-len", self.seq_len), ("--target-tokens", self.target_tokens),
            ("--dataset-tokens", self.dataset_tokens),
        ):
            checks.at_least(option, value)
        checks.positive("--base-lr", self.base_lr)
        checks.positive("--epochs", self.epochs)
        if (self.base_lr is None) != (self.base_batch is None):
            raise BadInput("--base-lr and --base-batch go together: a recipe's learning rate and the global batch it was tuned at")
        if not 0 < self.beta2 < 1:
            raise BadInput(f"--beta2 must lie between 0 and 1, not {self.beta2}")
        self._check_warmup()
        if self.epochs is not None and self.dataset_size is None:
            raise BadInput("--epochs needs --dataset-size (or --dataset-tokens) to count the optimizer steps")
        if (self.target_tokens is not None or self.dataset_tokens is not None) and self.seq_len is None:
            raise BadInput("--target-tokens and --dataset-tokens need --seq-len, the tokens in one sample")
        if self.gpu is not None and self.max_micro is not None:
            raise BadInput("--gpu estimates the limit from a probe and --max-micro gives it: give one of them")
        if self.strategy != "none" and self.max_micro is not None:
            raise BadInput("--strategy recomputes the limit from a probe's memory breakdown and --max-micro gives it: give one of them")
        checks.bucket_view(self.bucket_view, self.strategy, "auto")

    def _check_warmup(self) -> None:
        given = [v for v in (self.warmup_steps, self.warmup_epochs, self.warmup_ratio) if v is not None]
        if len(given) > 1:
            raise BadInput("give one of --warmup-steps, --warmup-epochs and --warmup-ratio, not several")
        if given and given[0] < 0:
            raise BadInput(f"a warmup cannot be negative ({given[0]})")
        if self.warmup_ratio is not None and self.warmup_ratio >= 1:
            raise BadInput(f"--warmup-ratio is a fraction of the training below 1, not {self.warmup_ratio}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Split(Record):
    """One exact way to reach the global batch on these devices."""

    micro_batch: int
    accumulation_steps: int
    seconds_per_step: float | None = None  # predicted time per optimizer step, from a probe's trials
    timing: str | None = None  # "measured", "interpolated" or "extrapolated" (flat past the probed batches)


@dataclass(frozen=True)
class Limit(Record):
    """The largest micro-batch one device takes, and where that number came from."""

    micro_batch: int | None  # None: no limit was known, so the plan has no memory bound
    source: str | None  # "--max-micro", or the probe's "recommended_batch" or "max_batch"
    probe: SavedProbe | None  # the probe read (--from, or the last one saved here): timings and BatchNorm
    gpu: str | None = None  # the catalogue GPU the limit was estimated for (--gpu), from the probe's memory line
    strategy: Strategy | None = None  # the strategy the limit was recomputed for (--strategy); None: as the probe ran

    def document(self) -> dict[str, Any]:
        probe = None if self.probe is None else self.probe.to_dict()
        return {"micro_batch": self.micro_batch, "source": self.source, "probe": probe, "gpu": self.gpu, "strategy": self.strategy}


@dataclass(frozen=True)
class StrategyOption(Record):
    """One strategy under `--strategy auto`: its per-device limit and the split with the fewest steps."""

    strategy: Strategy
    max_micro_batch: int | None  # None: not even batch 1 fits
    micro_batch: int | None  # None: no exact split within the limit
    accumulation_steps: int | None


@dataclass(frozen=True)
class PlanWarning(Record):
    code: str
    message: str  # what to do
    reason: str  # why, for this plan
    source: str | None  # the paper or fact behind it


@dataclass(frozen=True)
class Plan(Record):
    global_batch: int
    nodes: int
    gpus_per_node: int
    multiple_of: int
    choice: Split
    alternatives: tuple[Split, ...]
    chosen_by: str
    limit: Limit
    optimizer: Optimizer
    learning_rate: LearningRate | None
    warmup: Warmup | None
    schedule: Schedule | None
    warnings: tuple[PlanWarning, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)
    strategy: Strategy = Strategy.none  # --strategy, or the one --strategy auto recommends
    strategies: tuple[StrategyOption, ...] = ()  # with --strategy auto: every strategy, simplest first
    bucket_view: bool = False  # the limit assumes DDP's gradient_as_bucket_view (--bucket-view, or the probe ran so)
    seq_len: int | None = None  # --seq-len: tokens per sample
    target_tokens: int | None = None  # --target-tokens, as asked; global_batch is the whole samples it makes
    noise: NoiseEfficiency | None = None  # --noise-scale

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens_per_step(self) -> int | None:
        """What the optimizer step sees in tokens: the global batch in whole samples of --seq-len."""
        return None if self.seq_len is None else self.global_batch * self.seq_len

    @property
    def micro_batch(self) -> int:
        return self.choice.micro_batch

    @property
    def accumulation_steps(self) -> int:
        return self.choice.accumulation_steps

    def document(self) -> dict[str, Any]:
        """The JSON document; field names are a contract with scripts (docs/plan.md lists them)."""
        return {
            "schema": PLAN_SCHEMA,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "accumulation_steps": self.accumulation_steps,
            "world_size": self.world_size,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "multiple_of": self.multiple_of,
            "chosen_by": self.chosen_by,
            "seconds_per_step": self.choice.seconds_per_step,
            "limit": self.limit.to_dict(),
            "optimizer": self.optimizer,
            "learning_rate": None if self.learning_rate is None else self.learning_rate.value,
            "scaling": None if self.learning_rate is None else self.learning_rate.to_dict(),
            "warmup_steps": None if self.warmup is None else self.warmup.steps,
            "warmup": None if self.warmup is None else self.warmup.to_dict(),
            "steps_per_epoch": None if self.schedule is None else self.schedule.steps_per_epoch,
            "total_steps": None if self.schedule is None else self.schedule.total_steps,
            "alternatives": [split.to_dict() for split in self.alternatives],
            "strategy": self.strategy,
            "strategies": [option.to_dict() for option in self.strategies],
            "bucket_view": self.bucket_view,
            "warnings": [warning.to_dict() for warning in self.warnings],
            "notes": list(self.notes),
            "seq_len": self.seq_len,
            "target_tokens": self.target_tokens,
            "tokens_per_step": self.tokens_per_step,
            "noise": None if self.noise is None else self.noise.at(self.global_batch, self.world_size * self.multiple_of),
        }
