"""NoiseScale: the gradient noise scale B_simple followed during training, from gradients the run
computes anyway (docs/noise.md).

Under gradient accumulation each micro-batch's gradient is a small-batch gradient (B_small = the
micro-batch) and the accumulated one, after DDP's all-reduce where there is one, is a big-batch
gradient (B_big = micro-batch x accumulation steps x ranks). A hook on each parameter takes the
squared norm of every micro-batch's gradient as autograd hands it over, before it is added to
`.grad`: one extra norm per parameter per micro-batch, no copy of the gradients, and one read of
the result per optimizer step. McCandlish et al.'s estimates of |G|² and tr(Σ) from the two norms are
averaged over steps with an exponential moving average (planning/noise.py). AutoBatch(noise=...)
feeds it micro-batch by micro-batch, so the sizes follow its shrinks and a try that ran out of
memory is dropped.
"""

from __future__ import annotations

import math

import torch

from bsplan.planning.noise import MovingNoise, unbiased


class NoiseScale:
    """Follows B_simple = tr(Σ) / |G|² of a model trained with gradient accumulation or DDP.

    By hand: make it once with the model (it hooks the trainable parameters) and the sizes, call
    step() after the last backward of each optimizer step and before zero_grad, and read `value` at
    any time. Every micro-batch of a step must have `micro_batch` samples and weigh alike in the loss
    (each divided by the accumulation steps, or none): the noise scale does not depend on that weight,
    while gradient_norm_squared and trace_sigma are those of the loss averaged over the global batch
    when each micro-batch's mean loss is divided by the accumulation steps. Under DDP pass
    `world_size`; each rank's value uses its own micro-batches. Not for FSDP (its parameters are sharded).

    Without sizes, `NoiseScale(model)` is fed by `AutoBatch(noise=...)`, which gives them step by step
    (end_micro_batch, discard, end_step): they change when an out-of-memory shrinks the micro-batch.
    """

    def __init__(self, model: torch.nn.Module, micro_batch: int | None = None, accumulation_steps: int = 1, *,
                 world_size: int = 1, beta: float = 0.99) -> None:
        if micro_batch is None:
            if (accumulation_steps, world_size) != (1, 1):
                raise ValueError("accumulation_steps and world_size go with micro_batch; without it, AutoBatch(noise=...) "
                                 "gives the sizes")
        elif min(micro_batch, accumulation_steps, world_size) < 1:
            raise ValueError("micro_batch, accumulation_steps and world_size must be at least 1")
        elif accumulation_steps * world_size < 2:
            raise ValueError("the noise scale needs two batch sizes: accumulate at least two micro-batches, or run on two ranks")
        self.small_batch = micro_batch
        self.big_batch = None if micro_batch is None else micro_batch * accumulation_steps * world_size
        self.accumulation_steps = accumulation_steps
        self.moving = MovingNoise(beta)
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        self._open: torch.Tensor | float = 0.0  # the squared norms the hooks took since the last micro-batch closed
        self._closed: list[tuple[torch.Tensor | float, int]] = []  # this step's closed micro-batches: squared norm, samples
        self._handles = [p.register_hook(self._add) for p in self._parameters]

    def _add(self, grad: torch.Tensor) -> None:
        # Half-precision gradients are summed in float32 (without a copy); float64 ones stay float64.
        dtype = torch.promote_types(grad.dtype, torch.float32)
        self._open = self._open + torch.linalg.vector_norm(grad, dtype=dtype).square()

    def step(self, grad_scale: float = 1.0) -> float | None:
        """Take this optimizer step's norms into the averages and return the noise scale. With a
        GradScaler, pass scaler.get_scale() (before unscale_); a step with a non-finite norm, which
        the scaler skips, is skipped here too."""
        if self.small_batch is None or self.big_batch is None:
            raise ValueError("NoiseScale(model) without sizes is fed by AutoBatch(noise=...): give micro_batch and "
                             "accumulation_steps (or world_size) to call step() by hand")
        # Each micro-batch gradient weighs 1/accumulation_steps in .grad: scaled back to a whole small-batch gradient.
        small_sq = self.accumulation_steps * self._open
        self.discard()
        return self._update(small_sq, self.small_batch, self.big_batch, grad_scale)

    def end_micro_batch(self, samples: int) -> None:
        """Close the micro-batch whose backward has just run: `samples` samples, its loss weighed by
        their share of the step's (AutoBatch's loss contract). What the hooks take after the last
        one closes (the zero loss of AutoBatch's DDP sync) is not counted."""
        self._closed.append((self._open, samples))
        self._open = 0.0

    def discard(self) -> None:
        """Forget this step's micro-batches: a step re-run from zero gradients (AutoBatch after an
        out-of-memory, even one in the middle of a backward) must not count twice."""
        self._open = 0.0
        self._closed = []

    def end_step(self, world_size: int = 1) -> float | None:
        """After the closed micro-batches' gradients are accumulated in `.grad` (averaged over
        `world_size` ranks): their estimates into the averages, and the noise scale. Micro-batches of
        n_i of the step's N samples, each weighing n_i / N: Σ (n_i / N) |g_i|² has the expectation of
        |G_B|² at B = N / k for k micro-batches, whatever their sizes. One micro-batch on one rank
        gives no estimate (one batch size)."""
        closed = self._closed
        self.discard()
        samples = sum(n for _, n in closed)
        if len(closed) * world_size < 2:
            return self.value
        # A micro-batch's gradient g_i reaches .grad as (n_i / N) g_i, the hooks' h_i: (n_i / N) |g_i|² = (N / n_i) |h_i|².
        small_sq = samples * sum(squared / n for squared, n in closed)
        return self._update(small_sq, samples / len(closed), samples * world_size, 1.0)

    def _update(self, small_sq: torch.Tensor | float, small_batch: float, big_batch: float, grad_scale: float) -> float | None:
        grads = [p.grad for p in self._parameters if p.grad is not None]
        big_sq = float(sum(torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in grads)) / grad_scale**2
        small = float(small_sq) / grad_scale**2
        if math.isfinite(big_sq) and math.isfinite(small) and grads:
            self.moving.update(unbiased(small, big_sq, small_batch, big_batch))
        return self.value

    @property
    def value(self) -> float | None:
        """B_simple now; None before the first step, or while the averaged |G|² is not positive."""
        return self.moving.value

    @property
    def gradient_norm_squared(self) -> float | None:
        return self.moving.gradient_norm_squared

    @property
    def trace_sigma(self) -> float | None:
        return self.moving.trace_sigma

    @property
    def steps(self) -> int:
        return self.moving.steps

    def close(self) -> None:
        """Remove the hooks: the model trains on without the extra norms."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
