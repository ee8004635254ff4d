"""NoiseScale: the gradient noise scale B_simple followed during training, from gradients the run
computes anyway (docs/noise.md).

Under gradient accumulation each micro-batch's gradient is a small-batch gradient (B_small = the
micro-batch) and the accumulated one, after DDP's all-reduce where there is one, is a big-batch
gradient (B_big = micro-batch x accumulation steps x ranks). A hook on each parameter takes the
squared norm of every micro-batch's gradient as autograd hands it over, before it is added to
`.grad`: one extra norm per parameter per micro-batch, no copy of the gradients, and one read of
the result per optimizer step. McCandlish et al.'s estimates of |G|² and tr(Σ) from the two norms are
averaged over steps with an exponential moving average (planning/noise.py).
"""

from __future__ import annotations

import math

import torch

from bsplan.planning.noise import MovingNoise, unbiased


class NoiseScale:
    """Follows B_simple = tr(Σ) / |G|² of a model trained with gradient accumulation or DDP.

    Make it once with the model (it hooks the trainable parameters), call step() after the last
    backward of each optimizer step and before zero_grad, and read `value` at any time. Every
    micro-batch of a step must have `micro_batch` samples and weigh alike in the loss (each divided
    by the accumulation steps, or none): the noise scale does not depend on that weight, while
    gradient_norm_squared and trace_sigma are those of the loss averaged over the global batch when
    each micro-batch's mean loss is divided by the accumulation steps. Under DDP pass `world_size`;
    each rank's value uses its own micro-batches. Not for FSDP (its parameters are sharded).
    """

    def __init__(self, model: torch.nn.Module, micro_batch: int, accumulation_steps: int = 1, *, world_size: int = 1,
                 beta: float = 0.99) -> None:
        if micro_batch < 1 or accumulation_steps < 1 or world_size < 1:
            raise ValueError("micro_batch, accumulation_steps and world_size must be at least 1")
        if accumulation_steps * world_size < 2:
            raise ValueError("the noise scale needs two batch sizes: accumulate at least two micro-batches, or run on two ranks")
        self.small_batch = micro_batch
        self.big_batch = micro_batch * accumulation_steps * world_size
        self.accumulation_steps = accumulation_steps
        self.moving = MovingNoise(beta)
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        self._micro_sq: torch.Tensor | float = 0.0  # the squared norms of this step's micro-batch gradients, summed
        self._handles = [p.register_hook(self._add) for p in self._parameters]

    def _add(self, grad: torch.Tensor) -> None:
        self._micro_sq = self._micro_sq + torch.linalg.vector_norm(grad, dtype=torch.float32).square()

    def step(self, grad_scale: float = 1.0) -> float | None:
        """Take this optimizer step's norms into the averages and return the noise scale. With a
        GradScaler, pass scaler.get_scale() (before unscale_); a step with a non-finite norm, which
        the scaler skips, is skipped here too."""
        grads = [p.grad for p in self._parameters if p.grad is not None]
        big_sq = float(sum(torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in grads)) / grad_scale**2
        # Each micro-batch gradient weighs 1/accumulation_steps in .grad: scaled back to a whole small-batch gradient.
        small_sq = self.accumulation_steps * float(self._micro_sq) / grad_scale**2
        self._micro_sq = 0.0
        if math.isfinite(big_sq) and math.isfinite(small_sq) and grads:
            self.moving.update(unbiased(small_sq, big_sq, self.small_batch, self.big_batch))
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
