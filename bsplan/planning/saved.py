"""Saved probe results read back for `bsplan plan`: JSON only, so planning never imports torch.

`bsplan probe` saves its result (ProbeResult.to_dict(), docs/json.md) at results.LAST_PROBE in the working
directory, which lets `bsplan probe model.py` then `bsplan plan --target 1024 --gpus 4` work with no
file named; `--from FILE` reads any other saved probe (`bsplan probe --output FILE`) or a saved
estimate (`bsplan estimate --output FILE`, docs/estimate.md). A sweep over sequence lengths (`probe
--seq-len 512,1024`, schema bsplan.sweep/1) holds one such document per length: the plan reads the
one at its --seq-len. A saved `bsplan routes --output FILE` (bsplan.routes/1) gives its recommended route's
per-device limit, strategy, world size and knobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bsplan.planning.choices import Strategy
from bsplan.planning.errors import BadInput
from bsplan.planning.memory_line import MemoryLine, fit_top
from bsplan.planning.results import ESTIMATE_SCHEMA, PROBE_SCHEMA, ROUTES_SCHEMA, SWEEP_SCHEMA
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
    kind: str = "probe"  # or "estimate" (bsplan estimate --output), or "routes" (one route of bsplan routes --output)
    headroom: float = 0.1
    memory: MemoryLine | None = None  # peak over batch, for `plan --gpu`; None with fewer than two fitting batches
    layout: Layout = SINGLE  # what memory and the limits are per device under (a strategy probe or estimate)
    step_budget_bytes: int = 0  # what the limits left for a step on its device: its memory less CUDA overheads
    states: ModelStates | None = None  # one whole replica's model states, for `plan --strategy`
    settings: dict[str, Any] = field(default_factory=dict)  # the knobs the model was measured with (docs/sources.md)
    seq_len: int | None = None  # the tokens per sample it ran at; None: not recorded, or a model without one

    def to_dict(self) -> dict[str, str]:
        return {"file": self.path, "model": self.model_file, "device": self.device}

    def describe(self) -> str:
        where = "on" if self.kind == "probe" else "for"
        length = "" if self.seq_len is None else f" at sequence length {self.seq_len}"
        route = f" (route {self.settings['route']})" if self.kind == "routes" else ""
        return f"the {self.kind} of {self.model_file} {where} {self.device}{length} in {self.path}{route}"

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
            settings={**(data["model"].get("settings") or {}), "precision": data.get("precision")},  # what the exports carry
            seq_len=_optional_int(data.get("seq_len")),
        )


def load_probe(path: Path, seq_len: int | None = None) -> SavedProbe:
    """Read a saved probe or estimate, or a sweep's row at seq_len; a missing, unreadable or foreign
    file is refused with one sentence, and so is a limit measured at another sequence length than
    seq_len (memory grows with it, so that limit would not hold)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"no saved probe at {path}: run `bsplan probe MODEL.py --output {path}` first") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"cannot read the saved probe {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise BadInput(f"{path} is not JSON ({error.msg} at line {error.lineno}), so not a saved bsplan probe") from None
    return read_probe(path, data, seq_len)


def read_probe(path: Path | str, data: Any, seq_len: int | None = None, route: int | None = None) -> SavedProbe:
    """A probe's, an estimate's, a sweep's or a routes result's JSON document (read from path, or given
    in memory by the Python API) as a plan takes it, with load_probe's checks; of a routes result, route
    `route` (else its recommended one)."""
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in (PROBE_SCHEMA, ESTIMATE_SCHEMA, SWEEP_SCHEMA, ROUTES_SCHEMA):
        raise BadInput(f"{path} is not a {PROBE_SCHEMA} probe result, {ESTIMATE_SCHEMA} estimate, {SWEEP_SCHEMA} sweep or "
                       f"{ROUTES_SCHEMA} routes result (its schema is {schema!r})")
    try:
        if schema == SWEEP_SCHEMA:
            return _sweep_row(path, data, seq_len)
        probe = route_probe(str(path), data, route) if schema == ROUTES_SCHEMA else SavedProbe.from_dict(str(path), data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise BadInput(f"{path} is a damaged probe result ({type(error).__name__}: {error})") from None
    if seq_len is not None and probe.seq_len is not None and probe.seq_len != seq_len:
        raise BadInput(f"{path} was measured at sequence length {probe.seq_len}, not --seq-len {seq_len}, and its limit does not "
                       f"hold at another length: probe at {seq_len}, or sweep both with --seq-len {probe.seq_len},{seq_len}")
    return probe


def _sweep_row(path: Path, data: dict[str, Any], seq_len: int | None) -> SavedProbe:
    """The probe or estimate a sweep holds at seq_len; without it, or at a length not swept, one
    sentence that lists the lengths it has."""
    rows = {int(row["seq_len"]): row for row in data["sweep"]}
    lengths = ", ".join(str(length) for length in sorted(rows))
    if seq_len is None:
        raise BadInput(f"{path} is a sweep over sequence lengths {lengths}: give --seq-len with one of them to plan at that length")
    if seq_len not in rows:
        raise BadInput(f"{path} has no result at --seq-len {seq_len}: its sequence lengths are {lengths}")
    result = rows[seq_len].get("result")
    if not isinstance(result, dict) or result.get("schema") not in (PROBE_SCHEMA, ESTIMATE_SCHEMA):
        raise BadInput(f"{path} holds no {PROBE_SCHEMA} probe result or {ESTIMATE_SCHEMA} estimate at sequence length {seq_len}")
    return replace(SavedProbe.from_dict(str(path), result), seq_len=seq_len)


def route_probe(path: str, data: dict[str, Any], number: int | None = None) -> SavedProbe:
    """Route `number` of a routes result (its recommended one by default) as a plan takes a limit: its
    max_micro_batch per device under its strategy at its world size, measured with its knobs (the
    settings an export turns into config keys and notes). A route's limit has no headroom and no line
    of peak over batch, so it cannot be recomputed for another strategy or GPU."""
    number = data["recommended"] if number is None else number
    if number is None:
        raise BadInput(f"no route in {path} reaches its global batch {data['target']}, so it gives no per-device limit")
    route = next((route for route in data["routes"] if route["route"] == number), None)
    if route is None:
        raise BadInput(f"{path} has no route {number}")
    share = int(data["target"]) // int(route["world_size"])
    most = _optional_int(route["max_micro_batch"])
    lora = data.get("lora") if route["lora"] else None
    return SavedProbe(
        path=path, model_file=str(data["model"]["file"]), device=str(data["device"]["name"]), device_type=str(data["device"]["type"]),
        mode="train", max_batch=most, recommended_batch=most, has_batchnorm=bool(data["model"]["has_batchnorm"]),
        capped_at=share if most == share else None, interrupted=False, throughput=(), kind="routes", headroom=0.0,
        layout=Layout(Strategy(route["strategy"]), int(route["world_size"])), step_budget_bytes=int(data["device"]["total_bytes"]),
        settings={"route": number, "precision": route["precision"], "gradient_checkpointing": bool(route["activation_checkpointing"]),
                  "optimizer": route["optimizer"], "lora": lora},
        seq_len=_optional_int(data["model"].get("seq_len")),
    )


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
