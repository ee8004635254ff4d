"""bsplan as a library, on Python callables: bsplan.probe, bsplan.estimate and bsplan.plan return
the results the commands print (docs/api.md). A model file is one way to give the callables; here
they are passed directly. Torch is imported only when a model runs, as in the commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from bsplan.models.source import Callables, ModelSource
from bsplan.planning.units import parse_size

if TYPE_CHECKING:
    from bsplan.measure.options import Progress
    from bsplan.planning.plan import Plan
    from bsplan.planning.results import EstimateResult, ProbeResult
    from bsplan.planning.routes import RoutesResult


def probe(build_model: Callable[[], Any], make_batch: Callable[..., Any], *, loss: Callable[[Any, Any], Any] | None = None,
          optimizer: Callable[[Any], Any] | None = None, device: str | None = None, memory_limit: int | str | None = None,
          seq_len: int | None = None, progress: Progress | None = None, **options: Any) -> ProbeResult:
    """`bsplan probe` on callables: build_model() -> nn.Module, make_batch(batch_size[, seq_len]) -> a
    batch, loss(model, batch) -> a scalar (default: the model's .loss or its output's mean),
    optimizer(parameters) -> an optimizer (default AdamW). Other options are ProbeOptions' fields
    (precision, steps, max_batch, strategy, nproc, ...)."""
    from bsplan.measure.options import ProbeOptions
    from bsplan.measure.probe import run_probe

    limit = parse_size(memory_limit) if isinstance(memory_limit, str) else memory_limit
    probe_options = ProbeOptions(device=device, memory_limit=limit, **options)
    return run_probe(_source(build_model, make_batch, loss, optimizer, seq_len), probe_options, progress or _Silent())


def estimate(build_model: Callable[[], Any], make_batch: Callable[..., Any], *, loss: Callable[[Any, Any], Any] | None = None,
             optimizer: Callable[[Any], Any] | None = None, gpu: str | None = None, memory: int | str | None = None,
             seq_len: int | None = None, progress: Progress | None = None, **options: Any) -> EstimateResult:
    """`bsplan estimate` on callables: the largest batch for a catalogue GPU (gpu="H100-80GB") or a
    memory budget (memory="20GiB"), traced with fake tensors. Other options are the command's
    (precision, strategy, gpus, max_batch, cuda_context, method, ...)."""
    from bsplan.measure.estimate import run_estimate
    from bsplan.planning.prediction import EstimateOptions

    budget = str(memory) if isinstance(memory, int) else memory
    options.setdefault("precision", "fp32")
    estimate_options = EstimateOptions.from_cli(model_given=True, gpu=gpu, memory=budget, cuda_context=options.pop("cuda_context", None),
                                                max_batch=options.pop("max_batch", None), **options)
    return run_estimate(_source(build_model, make_batch, loss, optimizer, seq_len), estimate_options, progress or _Silent())


def plan(target: int, *, gpus: int = 1, nodes: int = 1, probe: ProbeResult | EstimateResult | RoutesResult | None = None,
         **options: Any) -> Plan:
    """`bsplan plan` for a global batch of `target` samples on nodes x gpus devices, its limit from a
    probe's or an estimate's result, or a routes result's route (its recommended one, or route=K), or
    max_micro=N. Other options are PlanOptions' fields
    (base_lr, base_batch, strategy, gpu, dataset_size, epochs, seq_len, ...)."""
    from bsplan.planning.plan import PlanOptions
    from bsplan.planning.planner import make_plan

    result = None if probe is None else probe.to_dict()
    return make_plan(PlanOptions(target, gpus_per_node=gpus, nodes=nodes, probe_result=result, **options))


def _source(build_model: Callable[[], Any], make_batch: Callable[..., Any], loss: Callable[[Any, Any], Any] | None,
            optimizer: Callable[[Any], Any] | None, seq_len: int | None) -> ModelSource:
    """The callables as a model source, named after build_model."""
    name = f"{getattr(build_model, '__module__', '?')}.{getattr(build_model, '__qualname__', type(build_model).__name__)}"
    return ModelSource(name, seq_len=seq_len, callables=Callables(build_model, make_batch, loss, optimizer))


class _Silent:
    """No progress: a library call prints nothing unless given a Progress."""

    def started(self, batch: int) -> None: ...
    def finished(self, trial: Any) -> None: ...
    def note(self, text: str) -> None: ...
