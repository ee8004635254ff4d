"""Saved probe results read back for `bsplan plan`: JSON only, so planning never imports torch.

`bsplan probe` saves its result (ProbeResult.to_dict(), docs/json.md) at results.LAST_PROBE in the working
directory, which lets `bsplan probe model.py` then `bsplan plan --target 1024 --gpus 4` work with no
file named; `--from FILE` reads any other saved probe (`bsplan probe --output FILE`) or a saved
estimate (`bsplan estimate --output FILE`, docs/estimate.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsplan.planning.choices import Strategy
from bsplan.planning.errors import BadInput
from bsplan.planning.memory_line import MemoryLine, fit_top
from bsplan.planning.results import ESTIMATE_SCHEMA, PROBE_SCHEMA
from bsplan.planning.strategies import SHARDED_PARAMETERS, SINGLE, Layout, ModelStates


@dataclass(frozen=True)
class SavedProbe:
    """What a plan takes from a probe: the limits, the model's BatchNorm, and the measured speed."""

    path: str
    model_file: str
    device: str
    device_type: str
    mode: str
    max_batch: int | None
    recommended_batch: int | None
    has_batchnorm: bool
    capped_at: int | None
    interrupted: bool
    throughput: tuple[tuple[int, float], ...]  # (batch, samples_per_second) of each fitting trial, by batch
    kind: str = "probe"  # or "estimate" (bsplan estimate --output)
    headroom: float = 0.1
    memory: MemoryLine | None = None  # peak over batch, for `plan --gpu`; None with fewer than two fitting batches
    layout: Layout = SINGLE  # what memory and the limits are per device under (a strategy probe or estimate)
    step_budget_bytes: int = 0  # what the limits left for a step on its device: its memory less CUDA overheads
    states: ModelStates | None = None  # one whole replica's model states, for `plan --strategy`

    def to_dict(self) -> dict[str, str]:
        return {"file": self.path, "model": self.model_file, "device": self.device}

    def describe(self) -> str:
        where = "for" if self.kind == "estimate" else "on"
        return f"the {self.kind} of {self.model_file} {where} {self.device} in {self.path}"

    @classmethod
    def from_dict(cls, path: str, data: dict[str, Any]) -> SavedProbe:
        """What a plan needs from a probe's or an estimate's JSON document (docs/json.md), read from `path`."""
        fitting = [trial for trial in data["trials"] if trial["fits"]]
        estimated = data["schema"] == ESTIMATE_SCHEMA
        layout = _layout(data)
        if estimated:  # its trials ran on the CPU, not on the device it predicts for: no timings to plan with
            throughput: list[tuple[int, float]] = []
            memory = MemoryLine(float(data["fit"]["base_bytes"]), float(data["fit"]["per_sample_bytes"]))
        else:
            throughput = sorted((int(t["batch"]), float(t["samples_per_second"])) for t in fitting if t["samples_per_second"])
            memory = fit_top([(int(t["batch"]), float(t["peak_bytes"])) for t in fitting if t["peak_bytes"] is not None])
        return cls(
            path=path,
            model_file=str(data["model"]["file"]),
            device=str(data["device"]["name"]),
            device_type=str(data["device"]["type"]),
            mode=str(data["mode"]),
            max_batch=_optional_int(data["max_batch"]),
            recommended_batch=_optional_int(data["recommended_batch"]),
            has_batchnorm=bool(data["model"]["has_batchnorm"]),
            capped_at=_optional_int(data.get("capped_at")),
            interrupted=bool(data.get("interrupted", False)),
            throughput=tuple(throughput),
            kind="estimate" if estimated else "probe",
            headroom=float(data["headroom"]),
            memory=memory,
            layout=layout,
            step_budget_bytes=int(data["device"]["total_bytes"]) - int(data.get("overheads", {}).get("total_bytes", 0)),
            states=_replica_states(data["breakdown"], layout, sharded=not estimated),
        )


def load_probe(path: Path) -> SavedProbe:
    """Read a saved probe; a missing, unreadable or foreign file is refused with one sentence."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"no saved probe at {path}: run `bsplan probe MODEL.py --output {path}` first") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"cannot read the saved probe {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise BadInput(f"{path} is not JSON ({error.msg} at line {error.lineno}), so not a saved bsplan probe") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in (PROBE_SCHEMA, ESTIMATE_SCHEMA):
        raise BadInput(f"{path} is not a {PROBE_SCHEMA} probe result or {ESTIMATE_SCHEMA} estimate (its schema is {schema!r})")
    try:
        return SavedProbe.from_dict(str(path), data)
    except (KeyError, TypeError, ValueError) as error:
        raise BadInput(f"{path} is a damaged probe result ({type(error).__name__}: {error})") from None


def _layout(data: dict[str, Any]) -> Layout:
    """The layout a probe ran under (`probe --nproc N --strategy S`) or an estimate predicted for;
    files from before strategies have none."""
    strategy = Strategy(data.get("strategy", "none"))  # an unknown one: ValueError, a damaged file
    return Layout(strategy, int(data.get("world_size", 1)), bool(data.get("bucket_view", False)))


def _replica_states(breakdown: dict[str, Any], layout: Layout, sharded: bool) -> ModelStates:
    """A whole replica's states: a strategy probe's breakdown is per device, a shard under FSDP (an
    estimate's is measured in one process). DDP's buckets are as measured, else one more copy of the
    gradients."""
    shards = layout.world_size if sharded and layout.strategy in SHARDED_PARAMETERS else 1
    parameters, gradients, state = (float(breakdown[key]) * shards for key in ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes"))
    buckets = float(breakdown.get("bucket_bytes") or 0) if layout.strategy == "ddp" else 0.0
    return ModelStates(parameters, gradients, state, buckets or gradients, float(breakdown.get("gathered_bytes") or 0))


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
