"""The whole plan: the per-device limit, the split, the learning rate, warmup and schedule, the
warnings. Pure arithmetic over plain data, with no torch and no terminal: `bsplan plan` starts in a
fraction of a second, and a script can plan without the CLI.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bsplan.planning.advice import BATCHNORM_MIN_MICRO, batchnorm_source, plan_warnings
from bsplan.planning.choices import Optimizer, Strategy
from bsplan.planning.comparison import choose_strategy
from bsplan.planning.decomposition import decompose
from bsplan.planning.errors import BadInput
from bsplan.planning.limit import resolve_limit
from bsplan.planning.plan import Limit, Plan, PlanOptions, StrategyOption
from bsplan.planning.scaling import Schedule, choose_warmup, scale_learning_rate


def make_plan(options: PlanOptions, cwd: Path = Path(".")) -> Plan:
    """The whole plan: split, learning rate, warmup, schedule, warnings."""
    strategies: tuple[StrategyOption, ...] = ()
    if options.strategy == "auto":
        limit, notes, strategies = choose_strategy(options, cwd)
    else:
        limit, notes = resolve_limit(options, cwd)
    probe = limit.probe
    if probe is not None and probe.kind == "routes" and probe.settings["optimizer"] == "sgd":
        options = replace(options, optimizer=Optimizer.sgd)  # the route's limit holds only with the SGD it was measured with
        notes.append("the route was measured with SGD (momentum 0.9): the plan's learning-rate scaling and warmup are SGD's")
    world = options.world_size
    notes[:0] = _token_notes(options, probe is not None and probe.seq_len is None)
    try:
        decomposition = decompose(
            options.global_batch, world, limit.micro_batch, options.multiple_of, () if probe is None else probe.throughput,
            BATCHNORM_MIN_MICRO if batchnorm_source(options, probe) else 1,
        )
    except BadInput as error:
        if options.target_tokens is None:
            raise
        raise BadInput(f"--target-tokens {options.target_tokens:,} is {options.global_batch} samples of --seq-len "
                       f"{options.seq_len}, and {error}") from None
    learning_rate = None
    if options.base_lr is not None and options.base_batch is not None:
        learning_rate = scale_learning_rate(
            options.base_lr, options.base_batch, options.global_batch, options.scaling, options.optimizer
        )
    else:
        notes.append("no learning rate: give --base-lr and --base-batch (a recipe's rate and the global batch it was tuned at) to scale one")
    schedule = None if options.dataset_size is None else Schedule.of(options.dataset_size, options.epochs, options.global_batch)
    warmup = choose_warmup(
        warmup_steps=options.warmup_steps, warmup_epochs=options.warmup_epochs, warmup_ratio=options.warmup_ratio,
        optimizer=options.optimizer, beta2=options.beta2, learning_rate=learning_rate, schedule=schedule,
    )
    if warmup is None:
        notes.append(f"no warmup: {options.optimizer}'s rule depends on whether the rate grows, so give --base-lr and --base-batch, or --warmup-*")
    elif warmup.steps is None:
        notes.append("warmup is known in epochs only: give --dataset-size to count it in optimizer steps")
    plan = Plan(
        global_batch=options.global_batch, nodes=options.nodes, gpus_per_node=options.gpus_per_node,
        multiple_of=options.multiple_of, choice=decomposition.choice, alternatives=decomposition.alternatives,
        chosen_by=decomposition.chosen_by, limit=limit, optimizer=options.optimizer, learning_rate=learning_rate,
        warmup=warmup, schedule=schedule, notes=tuple(notes), strategy=limit.strategy or Strategy(options.strategy),
        strategies=strategies, bucket_view=_bucket_view(limit, options), seq_len=options.seq_len,
        target_tokens=options.target_tokens, noise=options.noise,
    )
    return replace(plan, warnings=tuple(plan_warnings(plan, options)))


def _token_notes(options: PlanOptions, probe_without_length: bool) -> list[str]:
    """The plan in tokens, said where tokens were asked: what --target-tokens and --dataset-tokens
    became in whole samples, and a probe that did not record the length it ran at."""
    if options.seq_len is None:
        return []
    length, tokens = options.seq_len, options.global_batch * options.seq_len
    notes = []
    if options.target_tokens is not None and options.target_tokens != tokens:
        notes.append(f"--target-tokens {options.target_tokens:,} is not a whole number of samples of --seq-len {length} on each "
                     f"device: the plan takes {options.global_batch} samples, exactly {tokens:,} tokens per optimizer step")
    else:
        notes.append(f"in tokens: {options.global_batch} samples x {length} = {tokens:,} tokens per optimizer step")
    if options.dataset_tokens is not None and options.dataset_size is not None:
        partial = " (the last one partial)" if options.dataset_tokens % length else ""
        notes.append(f"--dataset-tokens {options.dataset_tokens:,} are {options.dataset_size:,} samples of {length} tokens{partial}")
    if probe_without_length:
        notes.append(f"the probe records no sequence length: its limit is taken to hold at --seq-len {length}")
    return notes


def _bucket_view(limit: Limit, options: PlanOptions) -> bool:
    """Whether the limit counts DDP's gradients once (in its buckets): recomputed for ddp with
    --bucket-view, or taken as it is from a probe that ran so."""
    if limit.strategy is not None:
        return limit.strategy == "ddp" and options.bucket_view
    return limit.source != "--max-micro" and limit.probe is not None and limit.probe.layout.bucket_view
