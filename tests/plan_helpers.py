"""Saved probes for the plan tests, built from the real ProbeResult so the JSON matches `bsplan probe`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bsplan.planning.results import LAST_PROBE, Breakdown, DeviceInfo, ModelInfo, ProbeResult, Trial

# A GPU probe of a small CNN: batch 52 fits, 53 does not, recommended 45; throughput peaks at 32.
TIMINGS = {1: 40.0, 2: 80.0, 4: 160.0, 8: 300.0, 16: 520.0, 32: 800.0, 48: 700.0, 52: 690.0}


def probe_data(
    *, max_batch: int | None = 52, recommended: int | None = 45, has_batchnorm: bool = False,
    timings: dict[int, float] | None = None, device_type: str = "cuda", mode: str = "train", **fields: Any,
) -> dict[str, Any]:
    trials = [Trial(b, True, 1000 * b, 0.1, rate) for b, rate in (TIMINGS if timings is None else timings).items()]
    if max_batch is not None:
        trials.append(Trial(max_batch + 1, False, None, 0.1, None, "CUDA out of memory"))
    result = ProbeResult(
        model=ModelInfo("models/cnn.py", 1_000_000, has_batchnorm),
        device=DeviceInfo("cuda:0 (NVIDIA H100 80GB HBM3)" if device_type == "cuda" else "cpu", device_type, 80 * 2**30, "device", True),
        mode=mode, precision="bf16", steps=3, multiple_of=1, headroom=0.1,
        max_batch=max_batch, first_oom_batch=None if max_batch is None else max_batch + 1,
        recommended_batch=recommended, peak_bytes=None, breakdown=Breakdown(4, 4, 8, True, 1000.0),
        trials=trials, **fields,
    )
    return result.to_dict()


def save_probe(directory: Path, data: dict[str, Any], path: Path = LAST_PROBE) -> Path:
    """Write a probe where `bsplan probe` saves it (or at path), relative to directory."""
    target = directory / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))
    return target
