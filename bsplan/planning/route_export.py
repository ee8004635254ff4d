"""A route as one tool reads it: the plan's own export (planning/export.py) of the route's split and
strategy, with the route's precision where the tool's config sets it. What a config cannot set
(checkpointing outside the Trainer, the optimizer, LoRA) goes in notes, as the plan's exports do.
"""

from __future__ import annotations

import json
from dataclasses import replace

from bsplan.planning.choices import ExportFormat, Optimizer, Precision
from bsplan.planning.errors import BadInput, NoFit
from bsplan.planning.export import Export, export_plan
from bsplan.planning.plan import PlanWarning
from bsplan.planning.planner import make_plan
from bsplan.planning.routes import Route, RoutesOptions, RoutesResult

# The optimizers the traces ran (measure/workload.py), for a training script to build the same.
_OPTIMIZER = {"sgd": "torch.optim.SGD(params, lr=..., momentum=0.9)", "adafactor": "torch.optim.Adafactor(params)"}


def chosen_route(result: RoutesResult, options: RoutesOptions) -> Route:
    """--route K, else the recommended route; one that does not fit is refused."""
    number = options.route or result.recommended
    if number is None:
        raise NoFit(f"no route reaches global batch {result.target} on {result.world_size} devices, so none is exported")
    route = next(route for route in result.routes if route.route == number)
    if not route.fits:
        raise BadInput(f"route {number} ({route.label}) does not fit, so it is not exported: {route.miss}")
    return route


def export_route(result: RoutesResult, options: RoutesOptions, fmt: str) -> tuple[Export, tuple[PlanWarning, ...]]:
    """The chosen route's config, and the warnings of the plan it is made from (planner.make_plan with
    the route's per-device limit, strategy and world size)."""
    route = chosen_route(result, options)
    optimizer = Optimizer.sgd if route.optimizer == "sgd" else options.plan.optimizer  # its warmup rule, as plan's (AdamW's)
    plan = make_plan(replace(options.plan, max_micro=route.max_micro_batch, optimizer=optimizer))
    limit = replace(plan.limit, source=f"route {route.route}", strategy=route.strategy)
    exported = export_plan(replace(plan, strategy=route.strategy, limit=limit), fmt)
    text, notes = exported.text, [f"route {route.route}: {route.label}", *exported.notes]
    bf16 = route.precision == Precision.bf16
    if fmt == ExportFormat.deepspeed and bf16:
        text = json.dumps({**json.loads(text), "bf16": {"enabled": True}}, indent=2)
        notes.append("DeepSpeed's bf16 keeps bf16 weights with fp32 master weights in the optimizer, where the route was "
                     "traced under autocast with fp32 weights: its model states per device differ (docs/routes.md)")
    elif fmt == ExportFormat.hf:  # the Trainer's bf16 is autocast, as traced; it enables the model's own checkpointing
        extra = {"bf16": True} if bf16 else {}
        text = json.dumps({**json.loads(text), **extra, **({"gradient_checkpointing": True} if route.activation_checkpointing else {})},
                          indent=2)
    elif fmt == ExportFormat.lightning and bf16:
        text += "\n  precision: bf16-mixed"
    elif bf16:
        notes.append("run the forward pass and the loss under torch.autocast('cuda', dtype=torch.bfloat16)")
    if route.activation_checkpointing and fmt != ExportFormat.hf:
        notes.append("enable activation checkpointing in the model: a Hugging Face model's gradient_checkpointing_enable(), "
                     "else torch.utils.checkpoint around each repeated block, as the route was traced")
    if route.optimizer in _OPTIMIZER:
        notes.append(f"the route trains with {_OPTIMIZER[route.optimizer]}: build it in the training script")
    if route.lora:
        notes.append(f"the route trains LoRA adapters {options.lora}: wrap the model with peft's get_peft_model(model, "
                     "LoraConfig(...)) before training")
    return Export(text, tuple(notes)), plan.warnings
