"""A route as one tool reads it: the plan of the route (planner.make_plan from the routes result, as
`bsplan plan --from ROUTES.json` plans it: the route's per-device limit, strategy and world size, its
knobs as the settings the limit was measured with) in the plan's own export (planning/export.py), so
bf16, mixed precision, checkpointing, the optimizer and LoRA become config keys or notes as a plan's do.
"""

from __future__ import annotations

from dataclasses import replace

from bsplan.planning.errors import BadInput, NoFit
from bsplan.planning.export import Export, export_plan
from bsplan.planning.plan import PlanWarning
from bsplan.planning.planner import make_plan
from bsplan.planning.routes import Route, RoutesOptions, RoutesResult


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
    plan = make_plan(replace(options.plan, probe_result=result.to_dict(), route=route.route))
    exported = export_plan(plan, fmt)
    return Export(exported.text, (f"route {route.route}: {route.label}", *exported.notes)), plan.warnings
