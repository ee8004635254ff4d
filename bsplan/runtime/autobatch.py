"""AutoBatch: a fixed batch per optimizer step, run in micro-batches that shrink when memory runs out.

A probe answers before training, but memory can still run out mid-run: a longer sequence, a
fragmentation spike, another process on the GPU. Retrying with a smaller batch, as Accelerate's
find_executable_batch_size does, changes the global batch and with it the learning-rate recipe.
AutoBatch keeps the batch and re-runs the step from its start in smaller micro-batches, with the
loss normalised over the whole step, so the gradient is the one the unsplit step gives (docs/plan.md:
accumulation equals the large batch only so). Under torch.distributed every rank agrees on each change, so DDP never waits for a
rank that gave up. docs/autobatch.md has the contract and the protocol.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bsplan.backends import cuda
from bsplan.backends.host import return_freed_memory
from bsplan.measure.oom import Failure, classify
from bsplan.measure.workload import Batch
from bsplan.planning.errors import first_line
from bsplan.runtime.noise import NoiseScale

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]

# A rank's status at an agreement point; the highest on any rank decides for all.
_OK, _OOM, _FATAL = 0, 1, 2


@dataclass(frozen=True)
class MicroBatchChange:
    """A change of the micro-batch: from `step` on (0 is the first call of AutoBatch.step), `old` became `new`."""

    step: int
    old: int
    new: int
    reason: str


class AutoBatchError(Exception):
    """The step cannot go on and must not be retried as it is: another rank stopped, the ranks
    disagree, or memory ran out inside DDP's all-reduce. Not a RuntimeError, so oom.classify and
    tools like it never take it for an out-of-memory to retry, even when it quotes one."""


class NoMicroBatchFits(AutoBatchError, torch.OutOfMemoryError):
    """Out of memory at the smallest micro-batch allowed: an out-of-memory (every rank raises it
    alike), so a caller may retry with a smaller model or batch."""


@dataclass(frozen=True)
class _Agreement:
    status: int
    micro_batch: int
    oom_rank: int


class AutoBatch:
    """Runs forward and backward of each optimizer step's batch in micro-batches; on out-of-memory
    it frees memory, halves the micro-batch (in multiples of `granularity`) and re-runs the step
    from zero gradients, so no step is lost or counted twice. The optimizer step stays the caller's.

    The loss contract (`reduction`): "sum", `loss_fn(model, micro_batch)` returns the sum of the
    per-sample (or per-token) losses of the micro-batch, and each is divided by the step's count
    (`count=` of step(), default its number of samples); "mean", it returns their mean, weighted by
    the micro-batch's share of the step's samples. `micro_batch=None` starts from the whole batch.
    `grow_after=N` doubles the micro-batch again after N steps in a row without an out-of-memory,
    up to where it started. `overlap_sync=False` never lets DDP all-reduce during a backward (see
    docs/autobatch.md: slower, but an out-of-memory anywhere can be retried). `noise=NoiseScale(model)`
    follows the gradient noise scale from the micro-batches (docs/noise.md): AutoBatch closes each
    micro-batch, discards a try that ran out of memory and ends every completed step.
    """

    def __init__(
        self,
        micro_batch: int | None = None,
        *,
        granularity: int = 1,
        grow_after: int | None = None,
        reduction: Literal["sum", "mean"] = "sum",
        overlap_sync: bool = True,
        process_group: Any = None,
        on_change: Callable[[MicroBatchChange], None] | None = None,
        noise: NoiseScale | None = None,
    ) -> None:
        if (micro_batch is not None and micro_batch < 1) or granularity < 1 or (grow_after is not None and grow_after < 1):
            raise ValueError("micro_batch, granularity and grow_after must be at least 1")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
        if noise is not None and noise.small_batch is not None:
            raise ValueError("give AutoBatch a NoiseScale(model) without sizes: the micro-batch changes, and AutoBatch "
                             "gives them")
        self.micro_batch = micro_batch
        self.granularity = granularity
        self.grow_after = grow_after
        self.reduction = reduction
        self.overlap_sync = overlap_sync
        self.process_group = process_group
        self.on_change = on_change
        self.noise = noise
        self.steps = 0
        self.changes: list[MicroBatchChange] = []
        self._ceiling: int | None = None  # where the micro-batch started: growing back stops there
        self._fitted = 0  # the largest micro-batch a whole step has completed at, on every rank
        self._completed_at = 0  # the micro-batch the last step completed at, since the last change (0: none)
        self._tentative = False  # an ambiguous error was taken as out-of-memory without evidence yet
        self._clean_steps = 0

    def step(self, model: torch.nn.Module, batch: Batch, loss_fn: LossFn, *, count: float | None = None) -> torch.Tensor:
        """Set the gradients to None, then accumulate the whole batch's gradient in micro-batches;
        returns the step's loss (detached). `count` normalises a summed loss (the step's tokens)."""
        size = batch_size(batch)
        total = self._total(size, count)
        ddp = _ddp(model)
        if self._ceiling is None:  # every rank starts from the smallest start any rank was given
            self.micro_batch = self._ceiling = self._agree(_OK, self.micro_batch or size, 0).micro_batch
        clean = True
        while True:
            micro = min(self.micro_batch or size, size)
            outcome = self._attempt(model, ddp, batch, loss_fn, micro, total)
            if isinstance(outcome, torch.Tensor):
                break
            clean = False
            self._shrink(model, micro, outcome)
        self._tentative = False
        self._fitted = max(self._fitted, micro)
        self._completed_at = micro
        if self.noise is not None:  # .grad holds the step's gradient, averaged over DDP's ranks
            self.noise.end_step(1 if ddp is None else dist.get_world_size(ddp.process_group))
        self.steps += 1
        self._grow(clean)
        return outcome

    def _total(self, size: int, count: float | None) -> float:
        if self.reduction == "mean":
            if count is not None:
                raise ValueError("count= normalises a summed loss: use reduction='sum' with a loss_fn that returns the sum")
            return size
        if count is not None and count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        return size if count is None else count

    def _attempt(
        self, model: torch.nn.Module, ddp: DistributedDataParallel | None, batch: Batch, loss_fn: LossFn, micro: int, total: float
    ) -> torch.Tensor | str:
        """One try at the whole step from zero gradients: its loss, or why memory ran out (on any rank).

        Every micro-batch runs under DDP's no_sync and is followed by an agreement that all ranks
        reach, ok or not. The gradients are then all-reduced once by DDP's reducer: during the last
        micro-batch's backward when a step at this size has already completed (overlap), else by a
        backward of a zero loss after every rank finished, which a retry never has to undo.
        """
        for parameter in model.parameters():
            parameter.grad = None
        if self.noise is not None:  # and no norm a failed try (or any backward since the last step) took
            self.noise.discard()
        if ddp is not None:
            ddp.require_forward_param_sync = True  # buffers are broadcast at the first forward, on every rank alike
        pieces = split_batch(batch, micro)
        # Overlap only at the size the last step completed at: the first step after any change
        # (a shrink, or growing back to a size that once ran out of memory) takes the safe sync.
        overlap = ddp is not None and self.overlap_sync and micro == self._completed_at
        losses = []
        for index, piece in enumerate(pieces):
            backward = not (overlap and index == len(pieces) - 1)
            reason = None
            try:
                loss = self._forward_backward(model, ddp, piece, loss_fn, total, backward)
            except Exception as error:  # noqa: BLE001 - classified right here
                reason = self._oom_reason(error, micro)
                if reason is None:
                    self._agree(_FATAL, micro, len(pieces))  # so the other ranks stop instead of waiting here
                    raise
            agreement = self._agree(_OOM if reason else _OK, micro, len(pieces))
            if agreement.status == _OOM:
                return reason or f"out of memory on rank {agreement.oom_rank}"
            losses.append(loss.detach())
            if backward and self.noise is not None:
                self.noise.end_micro_batch(batch_size(piece))
        if ddp is not None:
            self._synchronise(ddp, loss if overlap else None)
            if overlap and self.noise is not None:  # the last micro-batch's backward ran in the sync
                self.noise.end_micro_batch(batch_size(pieces[-1]))
        return torch.stack(losses).sum()

    def _forward_backward(
        self, model: torch.nn.Module, ddp: DistributedDataParallel | None, piece: Batch, loss_fn: LossFn, total: float, backward: bool
    ) -> torch.Tensor:
        share = batch_size(piece) if self.reduction == "mean" else 1
        with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
            loss = loss_fn(model, piece) * (share / total)
            if backward:
                loss.backward()
        return loss

    def _synchronise(self, ddp: DistributedDataParallel, pending: torch.Tensor | None) -> None:
        """All-reduce the step's gradients with DDP's own reducer (its buckets and comm hooks), armed
        as DDP's forward arms it when not under no_sync. Memory that runs out in this backward
        cannot be retried: the other ranks are already inside the all-reduce."""
        loss = pending if pending is not None else _zero_loss(ddp)
        ddp.reducer.prepare_for_backward([loss] if ddp.find_unused_parameters else [])
        try:
            loss.backward()
        except Exception as error:  # noqa: BLE001 - classified right here
            if classify(error) is Failure.OTHER:
                raise
            failed = first_line(error)
        else:
            return
        raise AutoBatchError(
            f"memory ran out in DDP's synchronising backward at micro-batch {self.micro_batch}, step {self.steps} "
            f"({failed}): the other ranks are inside the gradient all-reduce, so the step cannot be retried. "
            "End this process (torchrun then stops the others) and restart with a smaller micro_batch, "
            "or use AutoBatch(overlap_sync=False), which all-reduces only after every rank has finished"
        )

    def _oom_reason(self, error: Exception, micro: int) -> str | None:
        """Why the step ran out of memory, or None when the error is not out-of-memory.

        An ambiguous error (oom.Failure.AMBIGUOUS: exhaustion and real faults both produce it) is
        out-of-memory when a step at this micro-batch or a larger one has completed (the same code
        ran, so memory changed), or, once, when nothing shows it yet: if it comes back at the
        smaller micro-batch before a step completes, it is raised as the user's error.
        """
        failure = classify(error)
        message = first_line(error)
        if failure is Failure.OOM:
            return message
        if failure is Failure.AMBIGUOUS:
            if micro <= self._fitted:
                return f"{message!r} taken as out of memory: a step at micro-batch {self._fitted} completed before"
            if not self._tentative:
                self._tentative = True
                return f"{message!r} taken as out of memory for now: raised if it comes back at a smaller micro-batch"
        return None

    def _agree(self, status: int, micro: int, pieces: int) -> _Agreement:
        """Reduce every rank's status, micro-batch and number of micro-batches with one all_reduce
        (MAX of the values and of their negatives): the worst status and the smallest micro-batch win."""
        group = self.process_group
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
            return _Agreement(status, micro, 0)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        values = torch.tensor(
            [status, -micro, pieces, -pieces, -(rank if status == _OOM else world)],
            dtype=torch.int64,
            device=_collective_device(group),
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        worst, least_micro, most, least, first_oom = values.tolist()
        if worst == _FATAL and status != _FATAL:
            raise AutoBatchError(f"another rank stopped at step {self.steps} with its own error (see its traceback); this rank stops too")
        if most != -least:
            raise AutoBatchError(
                f"the ranks split step {self.steps} into {-least} to {most} micro-batches: give every rank the same "
                "batch size (DistributedSampler pads the data so they are; drop the last batch or pad it)"
            )
        return _Agreement(worst, -least_micro, -first_oom)

    def _shrink(self, model: torch.nn.Module, micro: int, reason: str) -> None:
        """Free what the failed try left (the caller holds no reference to the error any more) and halve."""
        for parameter in model.parameters():
            parameter.grad = None
        return_freed_memory()
        cuda.empty_cache()
        if micro <= self.granularity:
            raise NoMicroBatchFits(
                f"out of memory at micro-batch {micro}, the smallest allowed (granularity {self.granularity}), "
                f"at step {self.steps} ({reason}): the model, its gradients and optimizer state leave no room for "
                "a micro-batch; free memory on the device or shard the model"
            )
        self._change(micro, max(self.granularity, micro // 2 // self.granularity * self.granularity), reason)

    def _grow(self, clean: bool) -> None:
        self._clean_steps = self._clean_steps + 1 if clean else 0
        current, ceiling = self.micro_batch or 0, self._ceiling or 0
        if self.grow_after is None or self._clean_steps < self.grow_after or current >= ceiling:
            return
        self._clean_steps = 0
        self._change(current, min(ceiling, current * 2), f"{self.grow_after} steps in a row without running out of memory")

    def _change(self, old: int, new: int, reason: str) -> None:
        self.micro_batch = new
        self._completed_at = 0
        change = MicroBatchChange(self.steps, old, new, reason)
        self.changes.append(change)
        if self.on_change is not None:
            self.on_change(change)


def batch_size(batch: Batch) -> int:
    """Samples in a batch: the length of dim 0, which every tensor in it shares."""
    if isinstance(batch, torch.Tensor):
        tensors = [batch]
    else:
        tensors = list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) else []
    if not tensors or not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        raise TypeError(f"a batch is a tensor, a tuple/list of tensors or a dict of tensors, not {type(batch).__name__}")
    sizes = {tensor.shape[0] if tensor.dim() else 0 for tensor in tensors}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every tensor of a batch needs the same, non-zero length of dim 0 (the samples); got {sorted(sizes)}")
    return sizes.pop()


def split_batch(batch: Batch, micro_batch: int) -> list[Batch]:
    """Consecutive micro-batches of `micro_batch` samples, the last one the smallest; views, no copies."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(micro_batch))
    if isinstance(batch, dict):
        columns = {key: value.split(micro_batch) for key, value in batch.items()}
        return [dict(zip(columns, row)) for row in zip(*columns.values())]
    return [type(batch)(row) for row in zip(*(item.split(micro_batch) for item in batch))]


def _ddp(model: torch.nn.Module) -> DistributedDataParallel | None:
    if not isinstance(model, DistributedDataParallel):
        return None
    if model.static_graph:
        raise ValueError("AutoBatch does not support DistributedDataParallel(static_graph=True): a retried step changes the graph DDP recorded")
    return model


def _zero_loss(ddp: DistributedDataParallel) -> torch.Tensor:
    """A loss with gradient zero for every parameter: its backward fires DDP's hook on each, so the
    reducer all-reduces what the micro-batches accumulated and adds nothing (x * 0 has gradient 0
    even where x is inf or nan; a sum's gradient is an expanded scalar, so nothing large is allocated)."""
    return sum(parameter.sum() * 0 for parameter in ddp.module.parameters() if parameter.requires_grad)  # type: ignore[return-value]


def _collective_device(group: Any) -> torch.device:
    """Where the agreement's tensor lives: the CPU, unless the backend reduces CUDA tensors only (NCCL)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return cuda.current_device()
    return torch.device("cpu")
