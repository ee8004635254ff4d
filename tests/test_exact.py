"""Exact after out-of-memory: a search that ran out of memory several times reports the max_batch
that a fresh process checking that batch alone confirms, and max_batch + 1 fails there."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES, bsplan

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("example", "limit", "search"),
    [("mlp.py", "64MiB", "bisect"), ("mlp.py", "300MiB", "predict"), ("cnn.py", "300MiB", "predict"),
     ("transformer.py", "300MiB", "predict")],
)
def test_max_batch_is_confirmed_by_a_fresh_process(workdir: Path, example: str, limit: str, search: str) -> None:
    model = str(EXAMPLES / example)
    common = ["--device", "cpu", "--memory-limit", limit, "--json", "--no-save"]
    searched = bsplan("probe", model, *common, "--search", search, cwd=workdir)
    assert searched.code == 0, searched.stderr
    result = searched.json()
    largest = result["max_batch"]
    failures = sum(not trial["fits"] for trial in result["trials"])
    assert failures >= (3 if search == "bisect" else 1), "the search must have run out of memory (several times)"
    assert result["first_oom_batch"] == largest + 1

    alone = bsplan("probe", model, *common, "--min-batch", str(largest), "--max-batch", str(largest), cwd=workdir)
    assert alone.code == 0 and alone.json()["max_batch"] == largest
    # The same trial in a fresh process peaks at the same bytes: nothing a failed trial left behind counted.
    assert alone.json()["peak_bytes"] == result["peak_bytes"]

    above = bsplan("probe", model, *common, "--min-batch", str(largest + 1), "--max-batch", str(largest + 1), cwd=workdir)
    assert above.code == 3 and above.json()["max_batch"] is None
