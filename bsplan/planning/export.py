"""A plan as each tool reads it: a DeepSpeed config, Hugging Face TrainingArguments, a LightningCLI
config, torchrun's arguments.

The text holds only what the tool reads, so it can be redirected into a file as it is; what the tool
takes from elsewhere (the DataLoader's batch size, a launcher) goes in notes, which the CLI prints on
stderr. Values the plan does not know (no reference recipe: no learning rate) are left out, never
invented.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable

from bsplan.planning.choices import ExportFormat
from bsplan.planning.plan import Plan

# DeepSpeed's optimizer "type": its own Adam, AdamW and Lamb, else the torch.optim class of that name
# (deepspeed/runtime/engine.py, _configure_basic_optimizer). Its "Adam" runs as AdamW unless
# adam_w_mode is false. Neither DeepSpeed nor torch.optim has LARS.
_DEEPSPEED_OPTIMIZER: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {}), "adam": ("Adam", {"adam_w_mode": False}), "adamw": ("AdamW", {}), "lamb": ("Lamb", {}),
}


# ZeRO's stage per strategy (DeepSpeed's zero_optimization.stage; 0 is plain data parallelism), and
# Lightning's registered strategy names (lightning.pytorch.strategies.StrategyRegistry).
_ZERO_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
_LIGHTNING_STRATEGY = {"ddp": "ddp", "fsdp": "fsdp", "zero1": "deepspeed_stage_1", "zero2": "deepspeed_stage_2",
                       "zero3": "deepspeed_stage_3"}
_NOT_DEEPSPEED = "fsdp is PyTorch's FSDP, not DeepSpeed: DeepSpeed's equivalent is ZeRO stage 3 (--strategy zero3)"


@dataclass(frozen=True)
class Export:
    text: str  # exactly what the tool reads
    notes: tuple[str, ...]  # for the person: what the tool takes from elsewhere


def deepspeed_config(plan: Plan) -> Export:
    """DeepSpeed config JSON: the three batch numbers (it checks their product against the world size
    at start), the optimizer's lr and a linear WarmupLR scheduler (its default warmup is logarithmic)."""
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation_steps,
    }
    notes = []
    if plan.strategy in _ZERO_STAGE:
        config["zero_optimization"] = {"stage": _ZERO_STAGE[plan.strategy]}
    elif plan.strategy == "fsdp":
        notes.append(_NOT_DEEPSPEED)
    if _precision(plan) in ("bf16", "mixed"):  # DeepSpeed's bf16 is mixed: bf16 weights, fp32 master weights
        config["bf16"] = {"enabled": True}
    if _precision(plan) == "bf16":
        notes.append("DeepSpeed's bf16 keeps bf16 weights with fp32 master weights in the optimizer, where the limit was "
                     "measured under autocast with fp32 weights: its model states per device differ (docs/routes.md)")
    rate, warmup = plan.learning_rate, plan.warmup
    if rate is None:
        notes.append("no learning rate is known, so the config has no optimizer or scheduler section")
        return Export(json.dumps(config, indent=2), tuple(notes))
    measured_with = _settings(plan).get("optimizer")  # a route's: Adafactor is none of DeepSpeed's
    if plan.optimizer in _DEEPSPEED_OPTIMIZER and measured_with != "adafactor":
        name, extra = _DEEPSPEED_OPTIMIZER[plan.optimizer]
        momentum = {"momentum": 0.9} if measured_with == "sgd" else {}  # as the route was measured (measure/workload.py)
        config["optimizer"] = {"type": name, "params": {"lr": rate.value, **extra, **momentum}}
    else:
        missing = "Adafactor" if measured_with == "adafactor" else plan.optimizer
        notes.append(f"DeepSpeed has no {missing}: pass your own to deepspeed.initialize(optimizer=...) with lr {rate.value:g}")
    if warmup is not None and warmup.steps:
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": warmup.start_lr, "warmup_max_lr": rate.value,
            "warmup_num_steps": warmup.steps, "warmup_type": "linear",
        }}
    notes.extend(_warmup_notes(plan))
    return Export(json.dumps(config, indent=2), tuple(notes))


def hf_training_arguments(plan: Plan) -> Export:
    """Hugging Face TrainingArguments as JSON (HfArgumentParser.parse_json_file, or **kwargs)."""
    arguments: dict[str, Any] = {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation_steps,
    }
    if plan.learning_rate is not None:
        arguments["learning_rate"] = plan.learning_rate.value
    if plan.warmup is not None and plan.warmup.steps is not None:
        arguments["warmup_steps"] = plan.warmup.steps
    if _precision(plan) == "bf16" or _deepspeed_mixed(plan):  # the Trainer's bf16 is autocast, and DeepSpeed's is mixed
        arguments["bf16"] = True
    if _settings(plan).get("gradient_checkpointing"):
        arguments["gradient_checkpointing"] = True
    notes = [f"the Trainer takes the device count from its launcher: run it as torchrun {_torchrun_args(plan)} train.py"]
    if plan.strategy == "fsdp":  # Accelerate's FSDP plugin under the Trainer: full_shard is ZeRO-3's sharding
        arguments["fsdp"] = "full_shard auto_wrap"
        arguments["fsdp_config"] = {"fsdp_version": 2}
        notes.append("auto_wrap makes each of the model's _no_split_modules (its transformer layers) a unit, as "
                     "`bsplan probe --strategy fsdp` does")
    elif plan.strategy.startswith("zero"):  # the Trainer fills DeepSpeed's "auto" values from its own arguments
        arguments["deepspeed"] = {"zero_optimization": {"stage": _ZERO_STAGE[plan.strategy]}, "train_batch_size": "auto",
                                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  **({"bf16": {"enabled": "auto"}} if _deepspeed_mixed(plan) else {})}
    if plan.warmup is not None and plan.warmup.start_lr > 0:
        notes.append(f"the Trainer's warmup ramps from 0, not from the reference rate {plan.warmup.start_lr:g}")
    notes.extend(_warmup_notes(plan))
    return Export(json.dumps(arguments, indent=2), tuple(notes))


def lightning_config(plan: Plan) -> Export:
    """A LightningCLI config (`fit --config plan.yaml`); its trainer block is also Trainer(**kwargs)."""
    settings: list[tuple[str, object]] = [
        ("accumulate_grad_batches", plan.accumulation_steps), ("devices", plan.gpus_per_node), ("num_nodes", plan.nodes)
    ]
    if plan.strategy in _LIGHTNING_STRATEGY:
        settings.append(("strategy", _LIGHTNING_STRATEGY[plan.strategy]))
    if _precision(plan) == "bf16" or _deepspeed_mixed(plan):  # under a DeepSpeed strategy, DeepSpeed's bf16: mixed
        settings.append(("precision", "bf16-mixed"))
    lines = ["trainer:"] + [f"  {name}: {value}" for name, value in settings]
    notes = [f"Lightning takes the micro-batch from your DataLoader: batch_size={plan.micro_batch}"]
    if plan.learning_rate is not None:
        notes.append(f"and the learning rate from your configure_optimizers: lr={plan.learning_rate.value:g}")
    return Export("\n".join(lines), tuple(notes))


def torchrun_args(plan: Plan) -> Export:
    """torchrun's process layout; the micro-batch and accumulation belong to the training script."""
    notes = [f"the script itself runs micro-batch {plan.micro_batch} with {plan.accumulation_steps} accumulation steps"]
    if _precision(plan) == "bf16":
        notes.append("run the forward pass and the loss under torch.autocast('cuda', dtype=torch.bfloat16), as measured")
    if plan.nodes > 1:
        notes.append("on each node add --node_rank=RANK --master_addr=HOST (or --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT)")
    return Export(_torchrun_args(plan), tuple(notes))


def _torchrun_args(plan: Plan) -> str:
    return f"--nnodes={plan.nodes} --nproc_per_node={plan.gpus_per_node}"


# How each tool gets DDP's gradient_as_bucket_view, which a --bucket-view limit assumes.
_BUCKET_VIEW = {
    "deepspeed": "DeepSpeed runs its own data parallelism, not PyTorch DDP: plan with --strategy zero1, zero2 or zero3 for "
                 "a limit it keeps",
    "hf": "TrainingArguments cannot set it: plan with --strategy ddp and without --bucket-view for a limit the Trainer "
          "keeps",
    "lightning": "give the Trainer strategy=DDPStrategy(gradient_as_bucket_view=True) (its keyword arguments go to "
                 "DistributedDataParallel)",
    "torchrun": "wrap the model as DistributedDataParallel(model, gradient_as_bucket_view=True)",
}


def _bucket_view_notes(plan: Plan, tool: str) -> list[str]:
    """Without the bucket view DDP keeps a second copy of the gradients, and the limit does not hold."""
    if not plan.bucket_view:
        return []
    return [f"the per-device limit assumes DDP's gradient_as_bucket_view=True: {_BUCKET_VIEW[tool]}"]


def _warmup_notes(plan: Plan) -> list[str]:
    if plan.warmup is not None and plan.warmup.steps is None:
        return ["the warmup is known in epochs only, so it is left out: give --dataset-size to count it in steps"]
    return []


_EXPORTERS: dict[ExportFormat, Callable[[Plan], Export]] = {
    ExportFormat.deepspeed: deepspeed_config, ExportFormat.hf: hf_training_arguments,
    ExportFormat.lightning: lightning_config, ExportFormat.torchrun: torchrun_args,
}


def _settings(plan: Plan) -> dict[str, Any]:
    """The knobs the limit was measured with (the saved probe's model settings)."""
    return plan.limit.probe.settings if plan.limit.probe is not None else {}


def _precision(plan: Plan) -> str | None:
    """The precision the limit was measured at, where a route of `bsplan routes` gives it: bf16
    (autocast over fp32 weights) or mixed (bf16 weights, fp32 master weights)."""
    return _settings(plan).get("precision")


def _deepspeed_mixed(plan: Plan) -> bool:
    """A limit measured with bf16 weights and fp32 master weights, planned under ZeRO: DeepSpeed's bf16
    is exactly that, and the Trainer and Lightning turn it on through their DeepSpeed integrations."""
    return _precision(plan) == "mixed" and plan.strategy.startswith("zero")


# Where a tool's own settings cannot make `mixed` (bf16 weights with fp32 master copies), as measured.
_MIXED = {
    "hf": "the Trainer's bf16 is autocast over fp32 weights: for bf16 weights with fp32 master copies, as the limit was "
          "measured, give the Trainer a DeepSpeed config with bf16 enabled (--format deepspeed)",
    "lightning": "Lightning's bf16-mixed is autocast over fp32 weights and bf16-true has no fp32 master copies: for bf16 "
                 "weights with fp32 master copies, as the limit was measured, use a DeepSpeed strategy with bf16 enabled",
    "torchrun": "cast the model to bf16 and step fp32 master copies of its weights in the optimizer, as the limit was measured",
}


# The optimizers a limit may be measured with in place of the model file's (measure/workload.py).
_OPTIMIZER = {"sgd": "torch.optim.SGD(params, lr=..., momentum=0.9)", "adafactor": "torch.optim.Adafactor(params)"}


def _settings_notes(plan: Plan, tool: str) -> list[str]:
    """A limit measured with checkpointing, another optimizer or LoRA holds only where training runs them too."""
    settings, notes = _settings(plan), []
    if settings.get("gradient_checkpointing") and tool != "hf":
        notes.append("the per-device limit assumes gradient checkpointing: enable it in the model (a Hugging Face model's "
                     "gradient_checkpointing_enable(), else torch.utils.checkpoint around each repeated block)")
    if settings.get("precision") == "mixed" and tool in _MIXED and not (tool != "torchrun" and _deepspeed_mixed(plan)):
        notes.append(_MIXED[tool])
    if settings.get("optimizer") in _OPTIMIZER:
        notes.append(f"the per-device limit assumes {_OPTIMIZER[settings['optimizer']]}: build it in the training script")
    if settings.get("lora"):
        notes.append(f"the per-device limit assumes LoRA {settings['lora']}: wrap the model with peft's "
                     "get_peft_model(model, LoraConfig(...)) before training")
    return notes


def export_plan(plan: Plan, fmt: str) -> Export:
    """The plan in one of the ExportFormat choices."""
    fmt = ExportFormat.parse(fmt, "--format")
    export = _EXPORTERS[fmt](plan)
    return replace(export, notes=export.notes + tuple(_bucket_view_notes(plan, fmt) + _settings_notes(plan, fmt)))
