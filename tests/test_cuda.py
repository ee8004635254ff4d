"""On a real GPU (skipped without CUDA): the examples probe exactly, as on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, bsplan

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("example", ["mlp.py", "cnn.py", "transformer.py"])
def test_cuda_probe_is_confirmed_by_a_fresh_process(workdir: Path, example: str) -> None:
    model = str(EXAMPLES / example)
    common = ["--device", "cuda:0", "--memory-limit", "1GiB", "--json", "--no-save"]
    result = bsplan("probe", model, *common, cwd=workdir).json()
    largest = result["max_batch"]
    assert result["device"]["type"] == "cuda" and largest is not None
    alone = bsplan("probe", model, *common, "--min-batch", str(largest), "--max-batch", str(largest), cwd=workdir)
    assert alone.code == 0
    above = bsplan("probe", model, *common, "--min-batch", str(largest + 1), "--max-batch", str(largest + 1), cwd=workdir)
    assert above.code == 3


def test_cuda_peak_counts_the_optimizer_state(workdir: Path) -> None:
    result = bsplan("probe", str(EXAMPLES / "mlp.py"), "--device", "cuda", "--min-batch", "64", "--max-batch", "64",
                    "--json", "--no-save", cwd=workdir).json()
    memory = result["breakdown"]
    assert result["peak_bytes"] >= memory["parameter_bytes"] + memory["gradient_bytes"] + memory["optimizer_state_bytes"]
