"""A route as one tool reads it: the plan's own export (planning/export.py) of a plan made from the
route's per-device limit, strategy and world size, with the route's knobs as the settings the limit
was measured with (saved.route_probe, as `bsplan plan --from ROUTES.json` reads them), so that bf16,
checkpointing, the optimizer and LoRA become config keys or notes exactly as a plan's do.
"""

from __future__ import annotations

from dataclasses import replace

from bsplan.planning.choices import Optimizer
from bsplan.planning.errors import BadInput, NoFit
from bsplan.planning.export import Export, export_plan
from bsplan.planning.plan import PlanWarning
from bsplan.planning.planner import make_plan
from bsplan.planning.routes import Route, RoutesOptions, RoutesResult
from bsplan.planning.saved import route_probe


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
    """The chosen route's config, and the warnings of the plan it is made from."""
    route = chosen_route(result, options)
    optimizer = Optimizer.sgd if route.optimizer == "sgd" else options.plan.optimizer  # its warmup rule, as plan's (AdamW's)
    plan = make_plan(replace(options.plan, max_micro=route.max_micro_batch, optimizer=optimizer))
    probe = route_probe("the routes", result.to_dict(), route.route)
    limit = replace(plan.limit, source=f"route {route.route}", strategy=route.strategy, probe=probe)
    exported = export_plan(replace(plan, strategy=route.strategy, limit=limit), fmt)
    return Export(exported.text, (f"route {route.route}: {route.label}", *exported.notes)), plan.warnings
