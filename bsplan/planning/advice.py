"""What could make a plan train worse than its numbers suggest: each warning with what to do, why
for this plan, and its source."""

from __future__ import annotations

from bsplan.planning.comparison import fewest_steps, simplest_of_fewest
from bsplan.planning.noise import EFFICIENT_MULTIPLE, MCCANDLISH, MERRILL, NoiseEfficiency
from bsplan.planning.plan import Limit, Plan, PlanOptions, PlanWarning
from bsplan.planning.saved import SavedProbe
from bsplan.planning.scaling import ADAM_FAMILY, GOYAL, LAMB, LARS, MA_YARATS, WU_HE, adam_warmup_steps

# Wu & He 2018, Figure 1: BatchNorm's error rises as the batch per device shrinks below 32.
BATCHNORM_MIN_MICRO = 32
# Goyal et al. 2017: linear scaling with warmup matched small-batch accuracy on ImageNet up to 8k.
SGD_PLAIN_SCALING_MAX = 8192


def plan_warnings(plan: Plan, options: PlanOptions) -> list[PlanWarning]:
    """What could make this plan train worse than its numbers suggest, each with its reason and source."""
    warnings = _limit_warnings(plan.limit)
    probe = plan.limit.probe
    micro, world = plan.micro_batch, plan.world_size
    recomputed = plan.limit.gpu is not None or plan.limit.strategy is not None
    if probe is not None and not recomputed and probe.max_batch is not None and micro > probe.max_batch:
        warnings.append(PlanWarning(
            "above-probed-max", f"lower --max-micro to at most {probe.max_batch}",
            f"micro-batch {micro} is above the largest batch that fitted in {probe.describe()} ({probe.max_batch})", None,
        ))
    batchnorm = batchnorm_source(options, probe)
    if batchnorm is not None and micro < BATCHNORM_MIN_MICRO:
        synced = micro * world
        advice = (f"use SyncBatchNorm (it normalises over the {synced} samples of all {world} devices) or GroupNorm"
                  if synced >= BATCHNORM_MIN_MICRO else
                  f"use GroupNorm (SyncBatchNorm would still see only {synced} samples across the {world} devices)")
        warnings.append(PlanWarning(
            "batchnorm-small-micro", advice,
            f"the model has BatchNorm ({batchnorm}) and {micro} samples per device is below {BATCHNORM_MIN_MICRO}: "
            "its statistics see only the micro-batch, which accumulation does not enlarge",
            f"{WU_HE}, Figure 1",
        ))
    if options.optimizer == "sgd" and plan.global_batch > SGD_PLAIN_SCALING_MAX:
        warnings.append(PlanWarning(
            "large-batch-sgd", "consider LARS (--optimizer lars) or LAMB (--optimizer lamb)",
            f"global batch {plan.global_batch} is beyond 8k, where plain SGD with linear scaling and warmup "
            "stopped matching small-batch accuracy on ImageNet",
            f"{GOYAL}; {LARS}; {LAMB}",
        ))
    if plan.noise is not None and plan.global_batch > EFFICIENT_MULTIPLE * plan.noise.noise_scale:
        warnings.append(_noise_warning(plan, plan.noise))
    if plan.accumulation_steps > 1:
        steps = plan.accumulation_steps
        warnings.append(PlanWarning(
            "accumulation-loss",
            f"normalise the loss over the whole global batch: sum the per-sample (or per-token) losses of all {steps} "
            "micro-batches and divide by the global count, rather than averaging each micro-batch on its own",
            f"with {steps} accumulation steps each backward pass adds to the gradient; per-micro-batch means weigh "
            f"micro-batches of unequal sample or token counts equally and, unless divided by {steps}, make the gradient {steps} times too large",
            f"{GOYAL}, Remark 3 (normalise by the total minibatch size)",
        ))
    warnings.extend(_warmup_warnings(plan, options))
    return warnings


def _limit_warnings(limit: Limit) -> list[PlanWarning]:
    if limit.micro_batch is None:
        return [PlanWarning(
            "no-limit", "give --max-micro B, or run `bsplan probe MODEL.py` here first (or pass --from PROBE.json)",
            "no per-device limit was known (no --max-micro, no --from, no saved probe in .bsplan/), "
            "so this plan assumes the whole per-device share fits in memory with accumulation 1",
            None,
        )]
    probe = limit.probe
    warnings = []
    if probe is not None and probe.mode != "train":
        warnings.append(PlanWarning(
            "probe-not-training", "probe again without --mode infer",
            f"{probe.describe()} measured {probe.mode}, which needs less memory than a training step", None,
        ))
    if probe is not None and probe.interrupted:
        warnings.append(PlanWarning(
            "probe-interrupted", "run the probe to the end",
            f"{probe.describe()} was interrupted, so its limits are what it had confirmed so far", None,
        ))
    return warnings


def batchnorm_source(options: PlanOptions, probe: SavedProbe | None) -> str | None:
    if options.batchnorm is not None:
        return "--batchnorm" if options.batchnorm else None
    return f"found by the probe of {probe.model_file}" if probe is not None and probe.has_batchnorm else None


def _warmup_warnings(plan: Plan, options: PlanOptions) -> list[PlanWarning]:
    warmup, warnings = plan.warmup, []
    if warmup is None or warmup.steps is None:
        return warnings
    floor = adam_warmup_steps(options.beta2)
    if options.optimizer in ADAM_FAMILY and warmup.source == "given" and warmup.steps < floor:
        warnings.append(PlanWarning(
            "short-adam-warmup", f"warm up for at least {floor} steps",
            f"{warmup.steps} warmup steps is less than 2 / (1 - beta2) = {floor}, the time {options.optimizer}'s "
            "second-moment estimate needs to settle", MA_YARATS,
        ))
    total = None if plan.schedule is None else plan.schedule.total_steps
    if total is not None and warmup.steps > total:
        warnings.append(PlanWarning(
            "warmup-longer-than-training", "shorten the warmup or train for more epochs",
            f"the warmup of {warmup.steps} steps is longer than the {total} optimizer steps of the whole training", None,
        ))
    return warnings


def _noise_warning(plan: Plan, noise: NoiseEfficiency) -> PlanWarning:
    """A global batch past EFFICIENT_MULTIPLE noise scales: the steps it saves cost many more examples.
    It names the largest efficient batch these devices can split, and how."""
    global_batch, unit = plan.global_batch, plan.world_size * plan.multiple_of
    scale, steps, examples = noise.noise_scale, noise.steps_ratio(global_batch), noise.examples_ratio(global_batch)
    target = noise.efficient_target(unit)
    here = (f"; one step on these {plan.world_size} devices takes at least {unit}" if target is None
            else f": --target {target}{_split_at(plan, target)}")
    return PlanWarning(
        "beyond-noise-scale",
        f"use a smaller global batch (at most {noise.largest_efficient_batch}, {EFFICIENT_MULTIPLE:g}x the noise scale{here}) "
        f"and more optimizer steps, or a batch-size warmup that reaches {global_batch} only as the noise scale grows",
        f"global batch {global_batch} is {global_batch / scale:.3g}x the gradient noise scale {scale:.4g}: it needs "
        f"{steps:.3g}x the fewest optimizer steps but {examples:.3g}x the fewest training examples (and compute) to reach a "
        "loss; the noise scale grows as the loss falls, so measure it again later",
        f"{MCCANDLISH}, section 2.3 (S = S_min (1 + B/G), E = E_min (1 + G/B)); {MERRILL} (batch-size warmup)",
    )


def _split_at(plan: Plan, target: int) -> str:
    """The split of `target` with the fewest accumulation steps under this plan's limit; under
    `--strategy auto`, under the simplest strategy needing the fewest (comparison.py's rule)."""
    per_device = target // plan.world_size
    limits = [(row.strategy, row.max_micro_batch) for row in plan.strategies if row.max_micro_batch is not None]
    best = simplest_of_fewest([fewest_steps(strategy, most, per_device, plan.multiple_of)
                               for strategy, most in limits or [(plan.strategy, plan.limit.micro_batch)]])
    if best is None:
        return ""
    chosen = f" under {best.strategy}, the simplest strategy that needs the fewest accumulation steps there" if limits else ""
    return f" is {best.micro_batch} x {best.accumulation_steps} x {plan.world_size} devices{chosen}"
