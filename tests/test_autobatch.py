"""AutoBatch: split steps give the unsplit gradient, out-of-memory shrinks the micro-batch and re-runs the
step, and two gloo ranks agree on every change without hanging."""

from __future__ import annotations

import copy
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bsplan.backends.cpu import TensorBytesLimit
from bsplan.planning.noise import MovingNoise, unbiased
from bsplan.runtime.autobatch import AutoBatch, AutoBatchError, MicroBatchChange, NoMicroBatchFits, split_batch
from bsplan.runtime.noise import NoiseScale

Pair = tuple[torch.Tensor, torch.Tensor]


def _mlp(features: int = 8, hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def _regression(samples: int, features: int = 8, seed: int = 1) -> Pair:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, dtype=torch.float64, generator=generator)
    return inputs, torch.randn(samples, dtype=torch.float64, generator=generator)


def _sum_loss(model: nn.Module, batch: Pair) -> torch.Tensor:
    inputs, targets = batch
    return ((model(inputs).squeeze(-1) - targets) ** 2).sum()


def _mean_loss(model: nn.Module, batch: Pair) -> torch.Tensor:
    return _sum_loss(model, batch) / len(batch[0])


def _unsplit(model: nn.Module, batch: Any, loss_fn: Any, count: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference: the whole batch in one backward, the loss summed and divided by the count."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch) / count
    loss.backward()
    return loss.detach(), [parameter.grad.clone() for parameter in model.parameters()]


def _assert_same_gradient(model: nn.Module, expected: list[torch.Tensor]) -> None:
    for parameter, gradient in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(samples=st.integers(1, 13), micro=st.integers(1, 14), reduction=st.sampled_from(["sum", "mean"]))
def test_auto_split_step_gives_the_unsplit_gradient(samples: int, micro: int, reduction: str) -> None:
    model, batch = _mlp(), _regression(samples)
    loss_fn = _sum_loss if reduction == "sum" else _mean_loss
    expected_loss, expected = _unsplit(model, batch, _sum_loss, samples)
    loss = AutoBatch(micro, reduction=reduction).step(model, batch, loss_fn)  # type: ignore[arg-type]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    _assert_same_gradient(model, expected)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width, dtype=torch.float64)
        self.head = nn.Linear(width, vocab, dtype=torch.float64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def _token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over the real (unpadded) tokens."""
    logits = model(batch["tokens"][:, :-1])
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
    return (losses * batch["mask"][:, 1:]).sum()


def test_auto_token_normalised_step_gives_the_unsplit_gradient() -> None:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (10, 9), generator=generator)
    lengths = torch.tensor([9, 2, 5, 9, 3, 7, 2, 9, 4, 6])  # micro-batches of very different token counts
    batch = {"tokens": tokens, "mask": (torch.arange(9) < lengths[:, None]).double()}
    count = batch["mask"][:, 1:].sum().item()
    model = _TinyLM()
    expected_loss, expected = _unsplit(model, batch, _token_loss_sum, count)
    loss = AutoBatch(3).step(model, batch, _token_loss_sum, count=count)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    _assert_same_gradient(model, expected)
    # The test can tell: averaging each micro-batch's token mean weighs its tokens differently.
    pieces = split_batch(batch, 3)
    per_piece = sum(_token_loss_sum(model, piece) / piece["mask"][:, 1:].sum() for piece in pieces) / len(pieces)
    assert abs(per_piece.item() - expected_loss.item()) > 1e-3


def _peak_bytes(model: nn.Module, batch: Pair, micro: int) -> int:
    limit = TensorBytesLimit(2**40)
    model = copy.deepcopy(model)
    with limit:
        AutoBatch(micro).step(model, batch, _sum_loss)
    return limit.peak_bytes


def test_auto_loop_under_a_memory_limit_keeps_the_global_batch_and_the_gradient() -> None:
    model, batch_size = _mlp(features=64, hidden=512), 64
    # An exact limit that micro-batches of 8 fit and 16 do not, measured on this model.
    limit = TensorBytesLimit((_peak_bytes(model, _regression(batch_size, 64), 8) + _peak_bytes(model, _regression(batch_size, 64), 16)) // 2)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    reported: list[MicroBatchChange] = []
    auto = AutoBatch(batch_size, on_change=reported.append)  # starts with the whole batch: too large
    held_after_step = []
    for step in range(4):
        batch = _regression(batch_size, 64, seed=step)
        expected_loss, expected = _unsplit(reference, batch, _sum_loss, batch_size)  # no limit
        with limit:
            loss = auto.step(model, batch, _sum_loss)
        held_after_step.append(limit.current_bytes)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
        _assert_same_gradient(model, expected)
        optimizer.step()
        reference_optimizer.step()
    assert auto.steps == 4 and auto.micro_batch == 8
    assert len(set(held_after_step)) == 1  # the three failed tries of step 0 left nothing behind
    assert [(change.step, change.old, change.new) for change in auto.changes] == [(0, 64, 32), (0, 32, 16), (0, 16, 8)]
    assert reported == auto.changes
    assert all("bsplan's limit" in change.reason for change in auto.changes)  # the limit's own message
    for parameter, expected_parameter in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(parameter, expected_parameter, rtol=1e-12, atol=1e-14)


class _Capped(nn.Module):
    """Fails, with the message a GPU gives, on micro-batches of more than `capacity` samples."""

    def __init__(self, capacity: int, message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1, dtype=torch.float64)
        self.capacity = capacity
        self.message = message

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[0] > self.capacity:
            raise RuntimeError(self.message)
        return self.layer(inputs)


def _changes(auto: AutoBatch) -> list[tuple[int, int, int]]:
    return [(change.step, change.old, change.new) for change in auto.changes]


def test_auto_grows_back_after_clean_steps_up_to_where_it_started() -> None:
    model, batch = _Capped(capacity=4), _regression(16)
    auto = AutoBatch(16, grow_after=2)
    for step in range(7):
        if step == 3:
            model.capacity = 100  # the spike is over
        auto.step(model, batch, _sum_loss)
    assert _changes(auto) == [(0, 16, 8), (0, 8, 4), (3, 4, 8), (5, 8, 16)]
    assert auto.changes[2].reason == "2 steps in a row without running out of memory"
    assert auto.micro_batch == 16


def test_auto_error_that_is_not_out_of_memory_propagates_untouched() -> None:
    model, batch = _mlp(), _regression(16)
    raised = ValueError("a bug in the loss")

    def loss_fn(model: nn.Module, piece: Pair) -> torch.Tensor:
        if piece[0].shape[0] < 16:
            raise raised
        return _sum_loss(model, piece)

    auto = AutoBatch(8)
    with pytest.raises(ValueError) as caught:
        auto.step(model, batch, loss_fn)
    assert caught.value is raised
    assert auto.changes == [] and auto.micro_batch == 8


def test_auto_out_of_memory_at_the_smallest_micro_batch_is_a_clear_error() -> None:
    auto = AutoBatch(24, granularity=8)
    auto.step(_Capped(capacity=10), _regression(24), _sum_loss)
    assert _changes(auto) == [(0, 24, 8)]  # half of 24 rounded down to the granularity
    auto = AutoBatch(16, granularity=4)
    with pytest.raises(NoMicroBatchFits, match="out of memory at micro-batch 4, the smallest allowed") as caught:
        auto.step(_Capped(capacity=0), _regression(16), _sum_loss)
    assert isinstance(caught.value, torch.OutOfMemoryError)
    assert _changes(auto) == [(0, 16, 8), (0, 8, 4)]


def test_auto_ambiguous_error_needs_evidence_to_count_as_out_of_memory() -> None:
    primitive = "could not create a primitive"
    model, batch = _Capped(capacity=4, message=primitive), _regression(8)
    auto = AutoBatch(8)
    auto.step(model, batch, _sum_loss)  # taken as out-of-memory once, then confirmed: 4 fits
    assert _changes(auto) == [(0, 8, 4)] and "for now" in auto.changes[0].reason
    model.capacity = 2
    auto.step(model, batch, _sum_loss)  # at 4, which completed a step before: out-of-memory
    assert _changes(auto)[1:] == [(1, 4, 2)] and "completed before" in auto.changes[1].reason

    auto = AutoBatch(8)
    with pytest.raises(RuntimeError, match=primitive):  # back at 4 with no step completed: the user's error
        auto.step(_Capped(capacity=1, message=primitive), batch, _sum_loss)
    assert _changes(auto) == [(0, 8, 4)]


# Two ranks over gloo. Rank 1 runs out of memory in the forward at more than 8 samples and in the
# backward at more than 4; rank 0 never does. Then rank 1 runs out of memory inside DDP's
# synchronising backward, the one place a retry is impossible: it must fail on both ranks, not hang.

_RANKS, _PER_RANK = 2, 16


class _Limits:
    forward = backward = 1 << 30
    in_sync = staticmethod(lambda: False)


class _FlakyIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, limits: _Limits) -> torch.Tensor:
        if hidden.shape[0] > limits.forward:
            raise torch.OutOfMemoryError("CUDA out of memory (forced in the forward)")
        ctx.limits, ctx.samples = limits, hidden.shape[0]
        return hidden.clone()

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.samples > ctx.limits.backward or ctx.limits.in_sync():
            raise torch.OutOfMemoryError("CUDA out of memory (forced in the backward)")
        return gradient, None


class _FlakyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.limits = _Limits()
        self.register_buffer("scale", torch.ones(1, dtype=torch.float64))  # DDP broadcasts buffers in forward

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = _FlakyIdentity.apply(self.net[0](inputs), self.limits)
        return self.net[2](self.net[1](hidden)) * self.scale


def test_auto_feeds_the_noise_scale_as_wiring_it_by_hand_does_through_out_of_memory() -> None:
    """AutoBatch(noise=NoiseScale(model)) gives, at every step, the value of a NoiseScale wired by hand
    at the micro-batch the step completed at: a try that ran out of memory after a whole micro-batch,
    or in the middle of a backward (after the last layer's hooks), counts for nothing."""
    net, reference = _FlakyNet(), _FlakyNet()
    backwards = itertools.count(1)
    net.limits.in_sync = lambda: next(backwards) == 2  # step 0 at 8: the second micro-batch's backward, after the first's
    noise, hand = NoiseScale(net), NoiseScale(reference, 8, 2)
    auto = AutoBatch(8, noise=noise)
    for step in range(6):
        if step == 3:
            net.limits.backward = 2  # 4 now runs out in the middle of its first backward
        batch = _regression(16, seed=step)
        auto.step(net, batch, _sum_loss)
        hand.small_batch, hand.accumulation_steps = auto.micro_batch, 16 // auto.micro_batch  # what the hook follows
        reference.zero_grad(set_to_none=True)
        for piece in split_batch(batch, auto.micro_batch):
            (_sum_loss(reference, piece) / 16).backward()
        hand.step()
        assert noise.steps == hand.steps == step + 1
        assert (noise.gradient_norm_squared, noise.trace_sigma) == pytest.approx(
            (hand.gradient_norm_squared, hand.trace_sigma), rel=1e-9)
    assert _changes(auto) == [(0, 8, 4), (3, 4, 2)]
    with pytest.raises(ValueError, match="without sizes"):
        AutoBatch(noise=NoiseScale(net, 4, 2))


def _rank_main(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=_RANKS, timeout=timedelta(seconds=30))
    net = _FlakyNet()
    reference = copy.deepcopy(net)
    if rank == 1:
        net.limits.forward, net.limits.backward = 8, 4
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    noise = NoiseScale(net)
    auto = AutoBatch(noise=noise)  # starts from the whole batch of this rank
    by_hand = MovingNoise()
    report: dict[str, Any] = {"gradients_equal": [], "noise_scales": []}
    shard = slice(rank * _PER_RANK, (rank + 1) * _PER_RANK)
    for step in range(4):
        inputs, targets = _regression(_RANKS * _PER_RANK, seed=step)
        auto.step(model, (inputs[shard], targets[shard]), _sum_loss)
        _, expected = _unsplit(reference, (inputs, targets), _sum_loss, _RANKS * _PER_RANK)
        report["gradients_equal"].append(
            all(torch.allclose(p.grad, g, rtol=1e-12, atol=1e-14) for p, g in zip(net.parameters(), expected))
        )
        # By hand: this rank's micro-batch gradients (the small batch) against the all-reduced one (all 32 samples).
        pieces = split_batch((inputs[shard], targets[shard]), auto.micro_batch)
        small = [torch.autograd.grad(_sum_loss(reference, piece) / auto.micro_batch, list(reference.parameters()))
                 for piece in pieces]
        small_sq = sum(float(sum(g.square().sum() for g in grads)) for grads in small) / len(small)
        by_hand.update(unbiased(small_sq, float(sum(g.square().sum() for g in expected)), auto.micro_batch, _RANKS * _PER_RANK))
        report["noise_scales"].append([[noise.gradient_norm_squared, noise.trace_sigma],
                                       [by_hand.gradient_norm_squared, by_hand.trace_sigma]])
        optimizer.step()
        reference_optimizer.step()
    report["changes"] = [(change.step, change.old, change.new, change.reason) for change in auto.changes]
    if rank == 1:
        net.limits.in_sync = lambda: model.require_backward_grad_sync
    try:
        auto.step(model, (inputs[shard], targets[shard]), _sum_loss)
    except Exception as error:  # noqa: BLE001 - reported to the test
        report["last_step_error"] = f"{type(error).__name__}: {error}"
    Path(folder, f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # without destroying the group: rank 0 may still be inside the failed all-reduce


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_auto_two_gloo_ranks_agree_on_every_change_and_never_hang(tmp_path: Path) -> None:
    context = mp.start_processes(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=_RANKS, join=False, start_method="spawn")
    deadline = time.monotonic() + 90
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the two ranks hung")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(_RANKS)]
    for report in reports:
        assert [change[:3] for change in report["changes"]] == [[0, 16, 8], [0, 8, 4]]
        assert report["gradients_equal"] == [True] * 4  # equal to one process running the global batch of 32
        # Fed by AutoBatch (tries that ran out of memory on either rank dropped, the overlapped sync's last
        # micro-batch counted, the big batch over both ranks), the noise scale is the one wired by hand.
        for fed, by_hand in report["noise_scales"]:
            assert fed == pytest.approx(by_hand, rel=1e-9)
    assert "forced in the forward" in reports[1]["changes"][0][3]
    assert reports[0]["changes"][0][3] == "out of memory on rank 1"
    assert reports[1]["last_step_error"].startswith(f"{AutoBatchError.__name__}: memory ran out in DDP's synchronising backward")
    assert "last_step_error" in reports[0]  # released by gloo when rank 1 ended, not left waiting


def test_auto_example_trains_through_two_shrinks() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "train_autobatch.py"
    done = subprocess.run([sys.executable, str(example), "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "step 0: micro-batch 2048 -> 1024" in done.stdout and "step 1: micro-batch 1024 -> 512" in done.stdout
    assert "every step trained on 2048 samples" in done.stdout
