"""bsplan's default FSDP policy (measure/rank.py): the repeated blocks are the units, and a tied
parameter is never split between two of them, so a Hugging Face GPT-2 (its output layer is its
input embedding) shards; where the policy itself fails, the error is bsplan's, not the user's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import MODELS
from torch import nn

from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import _Quiet, run_probe
from bsplan.models.blocks import fsdp_units
from bsplan.planning.errors import BsplanError, UserCodeError

MIB = 2**20
NEEDS_TRANSFORMERS = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (the hf extra)")


def _ids(modules: list[nn.Module]) -> set[int]:
    return {id(module) for module in modules}


def _tiny_gpt2() -> nn.Module:
    from bsplan.measure.workload import load_workload

    return load_workload(MODELS / "gpt2_tied.py").build_model()


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.linear(self.norm(hidden))


class TiedLM(nn.Module):
    """Blocks in a ModuleList, no `_no_split_modules`, the head tied to the embedding."""

    def __init__(self, width: int = 8, vocab: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


@NEEDS_TRANSFORMERS
def test_a_hugging_face_gpt2_s_units_are_its_blocks_and_its_tied_embedding_stays_with_the_root() -> None:
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    units = fsdp_units(model)
    assert _ids(units) == _ids(list(model.transformer.h))
    assert all(type(unit).__name__ == "GPT2Block" for unit in units)
    inside = {id(parameter) for unit in units for parameter in unit.parameters()}
    assert id(model.lm_head.weight) not in inside and id(model.transformer.wpe.weight) not in inside


def test_the_blocks_of_the_largest_module_list_are_the_units_and_a_tied_head_is_not_split() -> None:
    model = TiedLM()
    model.small = nn.ModuleList([nn.Linear(2, 2)])  # a smaller list: not the blocks
    units = fsdp_units(model)
    assert _ids(units) == _ids(list(model.blocks))
    assert units == list(model.blocks)[::-1]  # children before parents, as fully_shard must reach them


def test_blocks_that_share_a_parameter_stay_with_the_root() -> None:
    model = TiedLM()
    model.blocks[1].linear.weight = model.blocks[0].linear.weight
    assert _ids(fsdp_units(model)) == {id(model.blocks[2])}


def test_without_blocks_each_submodule_holding_parameters_is_a_unit() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 2)))
    assert _ids(fsdp_units(model)) == _ids([model[0], model[2], model[3][0]])
    # torch's MultiheadAttention reads out_proj.weight without calling out_proj: out_proj stays in its unit.
    attention = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    assert _ids(fsdp_units(attention)) == _ids([attention[0], attention[1]])


def test_without_blocks_tied_parameters_are_never_split() -> None:
    embed, head = nn.Embedding(32, 8), nn.Linear(8, 32, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, nn.Linear(8, 8), head)
    assert _ids(fsdp_units(model)) == {id(model[1])}


def test_the_default_policy_s_failure_is_bsplan_s_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """fully_shard raising under the default policy is not the user's error: it says so, and what to do."""
    import torch.distributed.fsdp

    from bsplan.measure.rank import wrap
    from bsplan.measure.trace import _fake_group
    from bsplan.measure.workload import load_workload

    def refuse(module: nn.Module, **_: object) -> None:
        raise ValueError("no such unit")

    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", refuse)
    options = ProbeOptions(device="cpu", strategy="fsdp", nproc=2)
    with _fake_group(2), pytest.raises(BsplanError) as raised:
        wrap(nn.Sequential(nn.Linear(4, 4)), torch.device("cpu"), load_workload(MODELS / "tiny.py"), options)
    assert not isinstance(raised.value, UserCodeError)
    assert "default FSDP policy failed" in str(raised.value) and "shard_model(model)" in str(raised.value)


# --- end to end (slow: starts process groups) ----------------------------------------------------

@NEEDS_TRANSFORMERS
@pytest.mark.slow
def test_a_two_rank_fsdp_probe_of_a_tied_gpt2_fits() -> None:
    options = ProbeOptions(device="cpu", memory_limit=600 * MIB, nproc=2, strategy="fsdp", max_batch=4, steps=2)
    result = run_probe(MODELS / "gpt2_tied.py", options, _Quiet())
    assert result.max_batch == 4 and all(trial.fits for trial in result.trials)


@NEEDS_TRANSFORMERS
@pytest.mark.slow
def test_a_traced_fsdp_estimate_of_a_tied_gpt2_is_traced() -> None:
    from bsplan.measure.estimate import run_estimate
    from bsplan.planning.prediction import EstimateOptions
    from bsplan.planning.strategies import Layout

    result = run_estimate(MODELS / "gpt2_tied.py", EstimateOptions(memory_bytes=600 * MIB, layout=Layout("fsdp", 2), max_batch=64),
                          _Quiet())
    assert result.method == "trace" and result.max_batch == 64
    assert any("traced on a fake process group of 2 ranks" in note for note in result.notes)
    assert not any("could not be traced" in note for note in result.notes)


_RAISING_POLICY = """
import torch
from torch import nn
import torch.distributed.fsdp


def build_model():
    return nn.Sequential(nn.Linear(4, 4))


def make_batch(batch_size):
    return torch.randn(batch_size, 4)
"""


@pytest.mark.slow
@pytest.mark.parametrize("own", [False, True])
def test_a_failed_policy_is_bsplan_s_error_and_a_failed_shard_model_the_user_s(tmp_path: Path, own: bool,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On the ranks of a real probe: fully_shard failing under bsplan's default policy is bsplan's
    error (no user traceback); the model file's own shard_model failing is the user's."""
    import torch.distributed.fsdp

    # The probe imports the file in this process too: put back the fully_shard it replaces.
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", torch.distributed.fsdp.fully_shard)
    if own:
        source = _RAISING_POLICY + "\n\ndef shard_model(model):\n    raise ValueError('no such unit')\n"
    else:  # the file makes fully_shard fail, as a model bsplan's policy cannot shard would
        source = _RAISING_POLICY + "\n\ndef _refuse(module, **_):\n    raise ValueError('no such unit')\n\n\n" \
                                   "torch.distributed.fsdp.fully_shard = _refuse\n"
    model_file = tmp_path / "refused.py"
    model_file.write_text(source)
    options = ProbeOptions(device="cpu", memory_limit=600 * MIB, nproc=2, strategy="fsdp", max_batch=2, steps=2)
    with pytest.raises(BsplanError) as raised:
        run_probe(model_file, options, _Quiet())
    assert isinstance(raised.value, UserCodeError) == own
    assert ("default FSDP policy failed" in str(raised.value)) != own
