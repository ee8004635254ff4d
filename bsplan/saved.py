"""Saved probe results read back for `bsplan plan`: JSON only, so planning never imports torch.

`bsplan probe` saves its result (ProbeResult.to_dict(), docs/json.md) at result.LAST_PROBE in the working
directory, which lets `bsplan probe model.py` then `bsplan plan --target 1024 --gpus 4` work with no
file named; `--from FILE` reads any other saved probe (`bsplan probe --output FILE`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsplan.errors import BadInput
from bsplan.result import PROBE_SCHEMA


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

    def to_dict(self) -> dict[str, str]:
        return {"file": self.path, "model": self.model_file, "device": self.device}

    def describe(self) -> str:
        return f"the probe of {self.model_file} on {self.device} in {self.path}"


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
    if schema != PROBE_SCHEMA:
        raise BadInput(f"{path} is not a {PROBE_SCHEMA} probe result (its schema is {schema!r})")
    try:
        return _from_dict(str(path), data)
    except (KeyError, TypeError, ValueError) as error:
        raise BadInput(f"{path} is a damaged probe result ({type(error).__name__}: {error})") from None


def _from_dict(path: str, data: dict[str, Any]) -> SavedProbe:
    throughput = sorted(
        (int(trial["batch"]), float(trial["samples_per_second"]))
        for trial in data["trials"]
        if trial["fits"] and trial["samples_per_second"]
    )
    return SavedProbe(
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
    )


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
