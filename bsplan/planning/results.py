"""What a probe measured and what an estimate predicts: frozen dataclasses that render to a table
(cli/render.py) and to JSON (to_dict).

The JSON field names are a contract with scripts and with `bsplan plan --from`: change them only
with a new SCHEMA version (docs/json.md lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bsplan.planning.catalog import GpuModel
from bsplan.planning.memory_line import MemoryLine, Overheads
from bsplan.planning.record import Record
from bsplan.planning.strategies import DeviceStates

PROBE_SCHEMA = "bsplan.probe/1"
SWEEP_SCHEMA = "bsplan.sweep/1"  # a probe or an estimate at each of several sequence lengths
ROUTES_SCHEMA = "bsplan.routes/1"  # bsplan routes (planning/routes.py)
# Where `bsplan probe` saves its result for `bsplan plan` (relative to the working directory).
LAST_PROBE = Path(".bsplan") / "last-probe.json"
# Throughputs within 5% count as the same (a probe times only a few steps per batch): the probe's
# efficient_batch and the plan's choice of micro-batch both use it.
SAME_THROUGHPUT = 1.05
# The largest batch a probe tries and an estimate predicts unless --max-batch says otherwise.
DEFAULT_MAX_BATCH = 65536


@dataclass(frozen=True)
class Trial(Record):
    """One batch size tried with real training steps."""

    batch: int
    fits: bool
    peak_bytes: int | None  # None when the trial ran out of memory before the peak could be read
    seconds: float  # wall time of the whole trial, warm-up step included
    samples_per_second: float | None  # timed after the warm-up step; None when it did not fit
    error: str | None = None  # the out-of-memory message, first line, when it did not fit
    oom_evidence: str | None = None  # why an ambiguous error was taken for out-of-memory
    # Peaks of the last step's forward alone, and of its forward and backward, for the search:
    # each is a lower bound on the trial's peak and close to affine in the batch.
    forward_peak_bytes: int | None = None
    step_peak_bytes: int | None = None

    @property
    def point(self) -> tuple[int, int] | None:
        """(batch, peak bytes) on the memory line; None where it did not fit or has no peak."""
        return (self.batch, self.peak_bytes) if self.fits and self.peak_bytes is not None else None


@dataclass(frozen=True)
class DeviceInfo(Record):
    name: str  # "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"
    type: str  # "cuda" or "cpu"
    total_bytes: int  # the memory a batch may use: the card's total, or the limit in force
    limit_source: str  # what set total_bytes: "device", "--memory-limit", "MemAvailable", ...
    exact: bool  # False where the edge is a band (a limit from outside the process)


@dataclass(frozen=True)
class Breakdown(Record):
    """Static memory and the memory each sample adds, both from the measured trials."""

    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    optimizer_state_measured: bool  # False: estimated from the optimizer type (no step completed)
    activation_bytes_per_sample: float | None  # slope of peak over batch, None with no fitting trial
    bucket_bytes: int = 0  # what the strategy's wrapper allocated: DDP's gradient buckets (0 in one process)
    # What FSDP would hold unsharded at once (strategies.gathered_bytes): a fact of the model, not
    # part of static_bytes; 0 where not measured.
    gathered_bytes: int = 0

    @property
    def static_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes + self.bucket_bytes


@dataclass(frozen=True)
class ModelInfo(Record):
    file: str  # the source as given: a model file, hf:CONFIG or MODULE:CALLABLE
    parameters: int
    has_batchnorm: bool
    seq_len: int | None = None  # tokens per sample, where the source has a sequence length
    trainable_parameters: int | None = None  # those that train (fewer under LoRA); None: all of them
    settings: dict[str, Any] = field(default_factory=dict)  # the knobs asked (task, lora, gradient_checkpointing, attn)


@dataclass(frozen=True)
class ProbeResult(Record):
    model: ModelInfo
    device: DeviceInfo
    mode: str
    precision: str
    steps: int
    multiple_of: int
    headroom: float
    max_batch: int | None
    first_oom_batch: int | None
    recommended_batch: int | None
    peak_bytes: int | None
    breakdown: Breakdown
    trials: tuple[Trial, ...] = ()
    best_throughput_batch: int | None = None  # the fitting trial with the most samples per second
    efficient_batch: int | None = None  # the smallest fitting trial within 5% of that throughput
    capped_at: int | None = None  # the --max-batch cap when every batch up to it fitted
    interrupted: bool = False
    notes: tuple[str, ...] = ()
    world_size: int = 1  # processes (devices) the probe ran on; every number above is per device
    strategy: str = "none"  # "none" (one plain process), "ddp" or "fsdp"
    bucket_view: bool = False  # DDP ran with gradient_as_bucket_view=True
    schema: str = PROBE_SCHEMA

    def document(self) -> dict[str, Any]:
        data = super().document()
        data["breakdown"]["static_bytes"] = self.breakdown.static_bytes
        data["seq_len"] = self.model.seq_len
        return data


ESTIMATE_SCHEMA = "bsplan.estimate/1"


@dataclass(frozen=True)
class ModuleBytes(Record):
    name: str  # the module's qualified name in the model; <Class> for the model itself, <outside any module> for the loss
    activation_bytes: int  # what it saved for backward, live at the peak


@dataclass(frozen=True)
class PeakComposition(Record):
    """What the live tensors at a traced step's peak are (measure/attribution.py), by what made them:
    the model's parameters and buffers, gradients, optimizer state, activations saved for backward,
    and temporaries (the rest: the batch, outputs, the loss, a backward's intermediates)."""

    batch: int
    peak_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int
    temporary_bytes: int
    top_modules: tuple[ModuleBytes, ...]  # the modules that saved the most activation bytes, most first


@dataclass(frozen=True)
class EstimateResult(Record):
    """What `bsplan estimate` predicts for a device it did not run on: the probe's fields where they
    apply (max_batch, recommended_batch, peak_bytes and breakdown predicted; trials measured on the
    CPU), plus the fitted line, the CUDA overheads and the catalogue entry. docs/estimate.md."""

    model: ModelInfo
    device: DeviceInfo  # the target: a catalogue GPU (type "cuda") or a --memory budget (type "cpu")
    mode: str
    precision: str
    steps: int
    headroom: float
    max_batch: int | None
    recommended_batch: int | None
    peak_bytes: int | None  # predicted allocated peak at max_batch
    breakdown: Breakdown
    fit: MemoryLine  # peak = base_bytes + per_sample_bytes x batch, from the largest batches measured
    overheads: Overheads
    gpu: GpuModel | None
    trials: tuple[Trial, ...]  # measured on the CPU
    capped_at: int | None = None  # the --max-batch cap, when the prediction reaches it
    notes: tuple[str, ...] = ()
    # The model states on one device under --strategy (docs/strategies.md); fit is then that device's line.
    per_device: DeviceStates | None = None
    estimated: bool = True
    method: str = "run"  # "trace": the steps traced with fake tensors (measure/trace.py); "run": real CPU steps
    at_peak: PeakComposition | None = None  # traced: what the tensors at the peak of max_batch are
    schema: str = ESTIMATE_SCHEMA

    def document(self) -> dict[str, Any]:
        data = super().document()
        data["breakdown"]["static_bytes"] = self.breakdown.static_bytes
        data["overheads"] = self.overheads.to_dict()
        data["seq_len"] = self.model.seq_len
        if self.per_device is not None:
            data["per_device"] = self.per_device.to_dict()
            data.update({key: data["per_device"][key] for key in ("strategy", "world_size", "bucket_view", "static_bytes")})
        return data


STATES_SCHEMA = "bsplan.states/1"


@dataclass(frozen=True)
class StatesEstimate(Record):
    """`bsplan estimate --params`: the model states on one device from a parameter count alone (what
    DeepSpeed's estimators count), and a largest batch only where activations and a budget are known."""

    parameters: int
    optimizer: str
    precision: str
    per_device: DeviceStates
    activation_bytes_per_sample: float | None  # --activation-bytes-per-sample; None: activations left out
    device: DeviceInfo | None  # the budget (--gpu or --memory), if any
    overheads: Overheads
    headroom: float
    max_batch: int | None
    recommended_batch: int | None
    peak_bytes: int | None
    notes: tuple[str, ...] = ()
    schema: str = STATES_SCHEMA

    def document(self) -> dict[str, Any]:
        per_device = self.per_device.to_dict()
        return {
            "schema": self.schema, "parameters": self.parameters, "optimizer": self.optimizer, "precision": self.precision,
            **{key: per_device[key] for key in ("strategy", "world_size", "static_bytes")},
            "per_device": per_device, "activations_included": self.activation_bytes_per_sample is not None,
            "activation_bytes_per_sample": self.activation_bytes_per_sample,
            "device": None if self.device is None else self.device.to_dict(),
            "overheads": self.overheads.to_dict(), "headroom": self.headroom, "max_batch": self.max_batch,
            "recommended_batch": self.recommended_batch, "peak_bytes": self.peak_bytes, "notes": list(self.notes),
        }


@dataclass(frozen=True)
class SweepRow(Record):
    """One sequence length of a sweep: its probe's or estimate's answer in samples and in tokens."""

    seq_len: int
    result: ProbeResult | EstimateResult

    @property
    def max_tokens(self) -> int | None:
        return None if self.result.max_batch is None else self.result.max_batch * self.seq_len

    @property
    def tokens_per_second(self) -> float | None:
        """Measured at max_batch by a probe; an estimate times nothing."""
        rates = [t.samples_per_second for t in self.result.trials if t.fits and t.batch == self.result.max_batch]
        rate = next((r for r in rates if r is not None), None) if not isinstance(self.result, EstimateResult) else None
        return None if rate is None else rate * self.seq_len

    def document(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len, "max_batch": self.result.max_batch, "max_tokens": self.max_tokens,
            "recommended_batch": self.result.recommended_batch, "peak_bytes": self.result.peak_bytes,
            "tokens_per_second": self.tokens_per_second, "result": self.result.to_dict(),
        }


@dataclass(frozen=True)
class TokenBudget(Record):
    """The most tokens a micro-batch of any of the lengths may hold: the smallest max_tokens over the
    lengths, and the length that sets it (for length-bucketed and token-budget samplers). capped: some
    length fitted every batch up to --max-batch, so the budget is at least this, not at most."""

    tokens: int
    seq_len: int
    capped: bool = False


@dataclass(frozen=True)
class SweepResult(Record):
    """A probe or an estimate at each of several sequence lengths (`--seq-len 512,1024,2048`)."""

    command: str  # "probe" or "estimate"
    rows: tuple[SweepRow, ...]
    interrupted: bool = False  # Ctrl-C: the rows are the lengths measured until then
    schema: str = SWEEP_SCHEMA

    @property
    def model(self) -> ModelInfo | None:
        """The model as every row measured it, its length left to the rows; None before any row."""
        return replace(self.rows[0].result.model, seq_len=None) if self.rows else None

    @property
    def token_budget(self) -> TokenBudget | None:
        """None where some length fits no batch at all (no budget holds a sample of it), or where the
        sweep was interrupted (the lengths not measured may set it)."""
        if self.interrupted or not self.rows or any(row.max_tokens is None for row in self.rows):
            return None
        row = min(self.rows, key=lambda row: (row.max_tokens, -row.seq_len))
        capped = any(row.result.capped_at is not None for row in self.rows)
        return TokenBudget(row.max_tokens, row.seq_len, capped)  # type: ignore[arg-type]

    def document(self) -> dict[str, Any]:
        budget, model = self.token_budget, self.model
        return {
            "schema": self.schema, "command": self.command, "model": None if model is None else model.to_dict(),
            "sweep": [row.to_dict() for row in self.rows],
            "token_budget": None if budget is None else budget.to_dict(), "interrupted": self.interrupted,
        }
