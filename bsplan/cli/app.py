"""The `bsplan` command: parses options, calls the core, renders. No logic of its own.

Only light modules are imported at the top: torch is imported inside the commands that run a
model, so `bsplan --help` and `bsplan plan` start fast.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console

import bsplan.cli.sources as _sources
from bsplan.planning.choices import (
    Method, Mode, Optimizer, PlanFormat, PlanStrategy, Precision, ProbeLimit, ProbeStrategy, RunPrecision, Scaling, Search, Strategy,
)
from bsplan.planning.errors import BadInput, BsplanError, UserCodeError
from bsplan.planning.results import LAST_PROBE

# torch warns at import when NumPy is missing; bsplan never hands torch a NumPy array.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Find the exact largest batch your PyTorch training step fits, and plan global batches from it.",
)
stdout = Console(highlight=False, markup=False)  # paths and messages may hold [brackets]
stderr = Console(stderr=True, highlight=False, markup=False)

EXIT_NO_FIT = 3

@app.callback()
def _commands() -> None:
    """Keeps `bsplan COMMAND` a group of commands even while it has one."""


def _fail(error: BsplanError, json_out: bool) -> NoReturn:
    """One sentence on stderr (or a JSON object on stdout), the user's traceback where they raised."""
    if json_out:
        print(json.dumps(error.to_dict(), indent=2))
    if isinstance(error, UserCodeError):
        stderr.print(error.traceback_text, end="", markup=False, soft_wrap=True)
    if not json_out:
        stderr.print(f"error: {error}", markup=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


def _emit(data: dict[str, Any], show: Callable[[Console], None], json_out: bool, output: Path | None) -> None:
    """The result: one JSON document on stdout with --json, else a table; --output also saves the JSON."""
    if output is not None:
        _write_json(output, data)
    if json_out:
        print(json.dumps(data, indent=2))
    else:
        show(stdout)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Save a result; a file that cannot be written is a warning, never a lost result."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as error:
        stderr.print(f"warning: could not write {path}: {error.strerror}", markup=False)


@app.command()
def probe(
    model: str = typer.Argument(..., help=_sources.MODEL_HELP, metavar="MODEL"),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:N or cpu. Default: cuda:0 when CUDA is available, else cpu."),
    memory_limit: Optional[str] = typer.Option(
        None, help="Memory a batch may use, e.g. 300MiB, 2GiB, 2GB or bytes. On the CPU it counts tensor bytes exactly, like a GPU's allocator; without it, the CPU takes what the OS has available less 10% + 1 GiB."
    ),
    precision: RunPrecision = typer.Option(RunPrecision.fp32, help="fp32; autocast to bf16 / fp16 (fp16 with a GradScaler); mixed: bf16 weights, fp32 master weights."),  # type: ignore[valid-type, attr-defined]
    mode: Mode = typer.Option(Mode.train, help="train: forward, backward and optimizer step. infer: forward under inference_mode."),
    steps: int = typer.Option(3, help="Training steps per trial (>= 2: the first allocates the optimizer state and warms up)."),
    min_batch: int = typer.Option(1, help="Smallest batch to try."),
    max_batch: Optional[int] = typer.Option(None, help="Largest batch to try (default 65536). Equal to --min-batch: check exactly that batch."),
    multiple_of: int = typer.Option(1, help="Search only batches that are multiples of N (1: exact to one sample)."),
    headroom: float = typer.Option(0.1, help="Fraction of device memory kept free in recommended_batch."),
    search: Search = typer.Option(
        Search.predict, help="predict: jump to where the trials' memory line meets the limit (few trials). bisect: double, then bisect."
    ),
    nproc: int = typer.Option(1, help="Local processes, one device each (gloo on the CPU, NCCL on CUDA); the batch is per device."),
    strategy: Optional[ProbeStrategy] = typer.Option(  # type: ignore[valid-type]
        None, help="ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard). Default: ddp with --nproc above 1."
    ),
    bucket_view: bool = typer.Option(False, "--bucket-view", help="DDP with gradient_as_bucket_view=True (no second copy of the gradients)."),
    timeout: float = typer.Option(300.0, help="Seconds a rank may take for one trial before the probe stops with an error."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables."),
    output: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file."),
    save: bool = typer.Option(True, help=f"Save the result to {LAST_PROBE} for `bsplan plan` to use."),
    seq_len: Optional[str] = _sources.SEQ_LEN, task: Optional[str] = _sources.TASK, trust_remote_code: bool = _sources.TRUST_REMOTE_CODE,
    target_len: Optional[int] = _sources.TARGET_LEN, input_shape: Optional[str] = _sources.INPUT_SHAPE, vocab: Optional[int] = _sources.VOCAB,
    num_classes: Optional[int] = _sources.NUM_CLASSES, gradient_checkpointing: bool = _sources.GRADIENT_CHECKPOINTING,
    lora: Optional[str] = _sources.LORA, attn: Optional[str] = _sources.ATTN, plot: Optional[Path] = _sources.PLOT,
) -> None:
    """Run real training steps at growing batch sizes and find the exact largest batch that fits."""
    from bsplan.cli.charts import check_plot, save_chart
    from bsplan.cli.render import ProbeProgress, show_probe, show_sweep

    try:
        check_plot(plot)
        source, lengths = _sources.source_from(model, locals())
        from bsplan.measure import template
        from bsplan.measure.options import ProbeOptions

        options = ProbeOptions.from_cli(
            device=device, memory_limit=memory_limit, precision=precision, mode=mode, steps=steps,
            min_batch=min_batch, max_batch=max_batch, multiple_of=multiple_of, headroom=headroom, search=search,
            nproc=nproc, strategy=strategy or (Strategy.ddp if nproc > 1 else Strategy.none),
            bucket_view=bucket_view, timeout=timeout,
        )
        template.start_early(options)  # its import of torch runs beside this process's
        from bsplan.measure.probe import run_probe
        from bsplan.measure.sweep import sweep

        progress = ProbeProgress(stderr)
        with contextlib.redirect_stdout(sys.stderr):  # the model file's prints: stdout is the result's
            if lengths is None:
                result = run_probe(source, options, progress)
            else:
                result = sweep("probe", lambda at: run_probe(at, options, progress), source, lengths, progress)
    except BsplanError as error:
        _fail(error, json_out)
    data = result.to_dict()
    if save and not result.interrupted:
        _write_json(LAST_PROBE, data)
    _emit(data, lambda console: show_probe(console, result) if lengths is None else show_sweep(console, result), json_out, output)
    save_chart(result, plot, stderr)
    _exit_for(result)


def _exit_for(result: Any) -> None:
    """130 when interrupted; 3 when no batch fits (in a sweep: at some length); else 0."""
    if getattr(result, "interrupted", False):
        raise typer.Exit(130)
    rows = getattr(result, "rows", None)
    if any(row.result.max_batch is None for row in rows) if rows is not None else result.max_batch is None:
        raise typer.Exit(EXIT_NO_FIT)


@app.command()
def plan(
    target: Optional[int] = typer.Option(None, help="Global batch: samples per optimizer step over all devices (or give --target-tokens)."),
    target_tokens: Optional[str] = typer.Option(
        None, help="Global batch in tokens per optimizer step, with --seq-len: 4M = 4,000,000 (K, M, G, T are decimal), "
                   "4Mi = 4,194,304 (Ki, Mi, Gi, Ti binary); rounded down to whole samples."
    ),
    seq_len: Optional[int] = typer.Option(
        None, help="Tokens per sample, for --target-tokens and --dataset-tokens; with a saved --seq-len sweep, the length to plan at."
    ),
    gpus: int = typer.Option(1, help="Devices per node."),
    nodes: int = typer.Option(1, help="Nodes; the world size is nodes x gpus."),
    max_micro: Optional[int] = typer.Option(
        None, help=f"Largest micro-batch one device fits. Default: from --from, else the probe saved in {LAST_PROBE}."
    ),
    from_file: Optional[Path] = typer.Option(
        None, "--from", help="A saved probe, estimate, sweep or routes result (--output FILE): its limit, timings, BatchNorm."
    ),
    use: ProbeLimit = typer.Option(ProbeLimit.recommended, help="The probe's recommended_batch (keeps headroom) or its max_batch."),
    multiple_of: int = typer.Option(1, help="Only micro-batches that are multiples of N."),
    base_lr: Optional[float] = typer.Option(None, help="Learning rate of a reference recipe (with --base-batch)."),
    base_batch: Optional[int] = typer.Option(None, help="Global batch the reference recipe used --base-lr at."),
    scaling: Scaling = typer.Option(Scaling.auto, help="auto: linear for sgd/lars, square root for adam/adamw/lamb."),
    optimizer: Optimizer = typer.Option(Optimizer.adamw, help="Picks the auto scaling and warmup rules."),
    beta2: float = typer.Option(0.999, help="The Adam family's beta2: warmup of at least 2/(1-beta2) steps."),
    warmup_steps: Optional[int] = typer.Option(None, help="Warmup in optimizer steps (default: the rule that applies)."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Warmup in epochs."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Warmup as a fraction of all steps (needs --dataset-size, --epochs)."),
    dataset_size: Optional[int] = typer.Option(None, help="Samples per epoch: steps per epoch and warmup in steps."),
    dataset_tokens: Optional[str] = typer.Option(
        None, help="Tokens per epoch instead of --dataset-size, with --seq-len: 2G = 2,000,000,000, 2Gi = 2,147,483,648."
    ),
    epochs: Optional[float] = typer.Option(None, help="Epochs to train: total optimizer steps."),
    batchnorm: Optional[bool] = typer.Option(None, "--batchnorm/--no-batchnorm", help="Whether the model has BatchNorm (default: as the probe found)."),
    gpu: Optional[str] = typer.Option(None, help="Estimate the limit for this catalogue GPU (bsplan gpus --catalog) from the probe's memory per sample."),
    strategy: PlanStrategy = typer.Option(
        PlanStrategy.none, help="Recompute the limit for ddp, zero1, zero2, zero3 or fsdp at this world size from the probe; auto: compare them all."
    ),
    bucket_view: bool = typer.Option(False, "--bucket-view", help="DDP with gradient_as_bucket_view=True (its buckets hold the gradients)."),
    noise_scale: Optional[str] = typer.Option(None, help="Gradient noise scale B (or a saved `bsplan noise --output` file): steps and compute vs G."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as one JSON document (same as --format json)."),
    output_format: PlanFormat = typer.Option(
        PlanFormat.table, "--format", help="table, json, or what one tool reads: deepspeed, hf, lightning, torchrun."
    ),
) -> None:
    """Split a global batch (samples, or tokens with --seq-len) into micro-batch x accumulation steps x devices,
    with learning rate and warmup."""
    from bsplan.cli.render import show_plan, warning_text
    from bsplan.planning.export import export_plan
    from bsplan.planning.plan import PlanOptions
    from bsplan.planning.planner import make_plan

    fmt = PlanFormat.json if json_out else output_format
    try:
        if json_out and output_format not in (PlanFormat.table, PlanFormat.json):
            raise BadInput(f"--json and --format {output_format} ask for two outputs: give one of them")
        options = PlanOptions.from_cli(
            target=target, target_tokens=target_tokens, seq_len=seq_len, dataset_tokens=dataset_tokens,
            gpus_per_node=gpus, nodes=nodes, max_micro=max_micro, probe_file=from_file,
            use=use, multiple_of=multiple_of, base_lr=base_lr, base_batch=base_batch, scaling=scaling,
            optimizer=optimizer, beta2=beta2, warmup_steps=warmup_steps, warmup_epochs=warmup_epochs,
            warmup_ratio=warmup_ratio, dataset_size=dataset_size, epochs=epochs, batchnorm=batchnorm, gpu=gpu,
            strategy=strategy, bucket_view=bucket_view, noise_scale=noise_scale,
        )
        result = make_plan(options)
    except BsplanError as error:
        _fail(error, fmt == PlanFormat.json)
    if fmt in (PlanFormat.table, PlanFormat.json):
        _emit(result.to_dict(), lambda console: show_plan(console, result), fmt == PlanFormat.json, None)
        return
    exported = export_plan(result, fmt)
    print(exported.text)
    for warning in result.warnings:
        stderr.print(warning_text(warning), markup=False)
    for note in exported.notes:
        stderr.print(f"note: {note}", markup=False)


@app.command()
def gpus(
    catalog: bool = typer.Option(False, "--catalog", help="Print the catalogue of GPU models that --gpu accepts instead."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list (empty when there is no GPU) instead of a table."),
) -> None:
    """List the visible GPUs: NVIDIA's through NVML (memory used and free, processes, CUDA indices), AMD's through amdsmi."""
    from bsplan.cli.render import show_catalog, show_gpus
    from bsplan.planning.catalog import CATALOG

    if catalog and json_out:
        print(json.dumps([gpu.to_dict() for gpu in CATALOG], indent=2))
        return
    if catalog:
        show_catalog(stdout)
        return
    from bsplan.backends.nvml import query

    report = query(os.environ)
    if json_out:
        print(json.dumps([gpu.to_dict() for gpu in report.gpus], indent=2))
    if report.unavailable is not None:
        (stderr if json_out else stdout).print(f"no GPU to list: {report.unavailable}", markup=False, soft_wrap=True)
    elif not json_out:
        show_gpus(stdout, report)


import bsplan.cli.noise as _noise  # noqa: E402  (bsplan noise: its options and its run, beside its table)


@app.command()
def noise(model: str = _noise.MODEL, small_batch: Optional[int] = _noise.SMALL_BATCH, big_batch: Optional[int] = _noise.BIG_BATCH,
          max_steps: int = _noise.MAX_STEPS, rel_error: float = _noise.REL_ERROR, checkpoint: Optional[Path] = _noise.CHECKPOINT,
          allow_synthetic: bool = _noise.ALLOW_SYNTHETIC, device: Optional[str] = _noise.DEVICE, seed: int = _noise.SEED,
          json_out: bool = _noise.JSON, output: Optional[Path] = _noise.OUTPUT) -> None:
    """Measure the gradient noise scale B_simple = tr(Σ)/|G|² on your data at fixed weights: about the largest batch that pays."""
    _noise.run_noise_command(dict(locals()), _fail, _emit, stderr)


@app.command()
def estimate(
    model: Optional[str] = typer.Argument(None, help=_sources.MODEL_HELP + " Or give --params.", metavar="[MODEL]"),
    gpu: Optional[str] = typer.Option(None, help="A GPU of the catalogue (bsplan gpus --catalog), loosely: h100, H100-80GB, a100-40gb, 4090."),
    memory: Optional[str] = typer.Option(
        None, help="Memory to plan for, e.g. 300MiB or 20GiB. Alone: counted like probe --memory-limit. With --gpu: that GPU with this much free."
    ),
    precision: Precision = typer.Option(
        Precision.fp32, help="fp32; autocast to bf16 / fp16 (measured under CPU autocast); mixed: bf16 weights, fp32 master weights (2 + 2 + 12 bytes for Adam)."
    ),
    mode: Mode = typer.Option(Mode.train, help="train: forward, backward and optimizer step. infer: forward under inference_mode."),
    headroom: float = typer.Option(0.1, help="Fraction of the memory kept free in recommended_batch."),
    cuda_context: Optional[str] = typer.Option(None, help="Memory the driver and CUDA context take on the --gpu (default 1GiB)."),
    max_batch: Optional[int] = typer.Option(None, help="Largest batch to predict (default 65536, as probe)."),
    strategy: Strategy = typer.Option(Strategy.none, help="Per device under ddp, zero1, zero2, zero3 or fsdp (docs/strategies.md)."),
    gpus: int = typer.Option(1, help="Devices the --strategy spreads the model states over (the world size)."),
    bucket_view: bool = typer.Option(False, "--bucket-view", help="DDP with gradient_as_bucket_view=True (its buckets hold the gradients)."),
    params: Optional[str] = typer.Option(None, help="Instead of a model file: a parameter count (7.5e9, 7.5B) for its model states alone."),
    optimizer: Optional[Optimizer] = typer.Option(None, help="With --params: the optimizer whose state to count (default adamw)."),
    activation_bytes_per_sample: Optional[str] = typer.Option(
        None, help="With --params: activation memory per sample (e.g. a probe's), for a largest batch on --gpu or --memory."
    ),
    method: Method = typer.Option(
        Method.trace, help="trace: the probe's search on fake tensors (no memory, no compute; exact under a --memory budget). run: real steps on the CPU at small batches."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables."),
    output: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file (bsplan plan --from reads it)."),
    seq_len: Optional[str] = _sources.SEQ_LEN, task: Optional[str] = _sources.TASK, trust_remote_code: bool = _sources.TRUST_REMOTE_CODE,
    target_len: Optional[int] = _sources.TARGET_LEN, input_shape: Optional[str] = _sources.INPUT_SHAPE, vocab: Optional[int] = _sources.VOCAB,
    num_classes: Optional[int] = _sources.NUM_CLASSES, gradient_checkpointing: bool = _sources.GRADIENT_CHECKPOINTING,
    lora: Optional[str] = _sources.LORA, attn: Optional[str] = _sources.ATTN, plot: Optional[Path] = _sources.PLOT,
) -> None:
    """Predict the largest batch for a GPU you do not have (or any memory budget) from CPU training steps,
    per device under a data-parallel strategy; or the model states of a parameter count."""
    from bsplan.cli.charts import check_plot, save_chart
    from bsplan.cli.render import ProbeProgress, show_estimate, show_states, show_sweep

    try:
        check_plot(plot, has_trials=model is not None)
        from bsplan.planning.prediction import EstimateOptions, estimate_states

        options = EstimateOptions.from_cli(
            model_given=model is not None, gpu=gpu, memory=memory, cuda_context=cuda_context, max_batch=max_batch,
            strategy=strategy, gpus=gpus, bucket_view=bucket_view, params=params, optimizer=optimizer,
            activation_bytes_per_sample=activation_bytes_per_sample, precision=precision, mode=mode, headroom=headroom,
            method=method,
        )
        if model is None:
            _sources.refuse_without_model(locals())
            states = estimate_states(options)
            _emit(states.to_dict(), lambda console: show_states(console, states), json_out, output)
            if states.device is not None and states.activation_bytes_per_sample is not None and states.max_batch is None:
                raise typer.Exit(EXIT_NO_FIT)
            return
        source, lengths = _sources.source_from(model, locals())
        from bsplan.measure.estimate import run_estimate
        from bsplan.measure.sweep import sweep

        progress = ProbeProgress(stderr)
        with contextlib.redirect_stdout(sys.stderr):  # the model file's prints: stdout is the result's
            if lengths is None:
                result = run_estimate(source, options, progress)
            else:
                result = sweep("estimate", lambda at: run_estimate(at, options, progress), source, lengths, progress)
    except BsplanError as error:
        _fail(error, json_out)
    _emit(result.to_dict(), lambda console: show_estimate(console, result) if lengths is None else show_sweep(console, result),
          json_out, output)
    save_chart(result, plot, stderr)
    _exit_for(result)


@app.command()
def routes(
    model: str = typer.Argument(..., help=_sources.MODEL_HELP, metavar="MODEL"),
    target: Optional[int] = typer.Option(None, help="Global batch: samples per optimizer step over all devices (or --target-tokens)."),
    target_tokens: Optional[str] = typer.Option(None, help="Global batch in tokens per optimizer step, with --seq-len (4M, 4Mi)."),
    gpu: Optional[str] = typer.Option(None, help="A GPU of the catalogue (bsplan gpus --catalog): its memory and NVLink."),
    memory: Optional[str] = typer.Option(None, help="Memory per device, e.g. 300MiB (counted like probe --memory-limit); with --gpu: its free memory."),
    gpus: int = typer.Option(1, help="Devices per node."), nodes: int = typer.Option(1, help="Nodes; the world size is nodes x gpus."),
    current: Optional[str] = typer.Option(None, help="Your setup, e.g. bf16,checkpointing,sgd,zero2 (default: fp32, the model's optimizer, ddp)."),
    interconnect: Optional[float] = typer.Option(None, help="GB/s each GPU sends at (nccl-tests busbw). Default: half the --gpu's NVLink."),
    noise_scale: Optional[str] = typer.Option(None, help="Gradient noise scale B (or a saved `bsplan noise --output` file): the target against it."),
    trace_wrappers: bool = typer.Option(False, "--trace-wrappers", help="Trace DDP and FSDP on a fake process group per setting (3 traces, not 1)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (bsplan.routes/1) instead of tables."),
    output_format: PlanFormat = typer.Option(PlanFormat.table, "--format", help="table, json, or the route for deepspeed, hf, lightning, torchrun."),
    route: Optional[int] = typer.Option(None, help="With --format: export route K instead of the recommended one."),
    output: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file."),
    seq_len: Optional[str] = _sources.SEQ_LEN, task: Optional[str] = _sources.TASK, trust_remote_code: bool = _sources.TRUST_REMOTE_CODE,
    target_len: Optional[int] = _sources.TARGET_LEN, input_shape: Optional[str] = _sources.INPUT_SHAPE, vocab: Optional[int] = _sources.VOCAB,
    num_classes: Optional[int] = _sources.NUM_CLASSES, lora: Optional[str] = _sources.LORA, attn: Optional[str] = _sources.ATTN,
) -> None:
    """Every way to reach a global batch on N devices, ranked: memory traced per route, time modelled; --format exports one."""
    from bsplan.cli.routes import run_routes_command

    run_routes_command(dict(locals()), _fail, _emit, stderr)


def _wants_json(argv: list[str]) -> bool:
    pairs = zip(argv, argv[1:])
    return "--json" in argv or "--format=json" in argv or any(pair == ("--format", "json") for pair in pairs)


def main() -> NoReturn:
    """Console entry point: typer's own usage errors also become one sentence (JSON with --json)."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        code = 130
    except typer.TyperException as error:
        if _wants_json(sys.argv[1:]):
            print(json.dumps({"error": error.format_message(), "kind": "BadInput"}, indent=2))
        else:
            error.show()  # type: ignore[attr-defined]
        code = BadInput.exit_code
    _exit(code if isinstance(code, int) else 0)


def _exit(code: int) -> NoReturn:
    """Exit. Once a model has run, the interpreter's final garbage collections walk every object
    torch's modules made (torch._dynamo, sympy: millions) after the result is out, about 0.5 s;
    freezing them first skips that walk, while the teardown still runs the atexit handlers, joins
    threads and flushes files as usual."""
    if "torch" in sys.modules:
        gc.freeze()
    sys.exit(code)

