"""Accelerate's `find_executable_batch_size`, keeping the global batch: after an out-of-memory the
micro-batch shrinks and the gradient accumulation grows, so every optimizer step still sees the
same number of samples (Accelerate's halves the batch and so changes the global batch).

    @find_executable_batch_size(global_batch=1024)
    def train(batch_size, accumulation_steps):
        ...   # build the DataLoader with batch_size, accumulate accumulation_steps micro-batches

No Accelerate needed. docs/integrations.md.
"""

from __future__ import annotations

import functools
import gc
from typing import Any, Callable, TypeVar

from bsplan.backends import cuda
from bsplan.backends.host import return_freed_memory
from bsplan.measure.oom import Failure, classify
from bsplan.planning.errors import BadInput

T = TypeVar("T")


def find_executable_batch_size(function: Callable[..., T] | None = None, *, global_batch: int,
                               starting_batch_size: int | None = None) -> Any:
    """Call function(batch_size, accumulation_steps, *args) with batch_size x accumulation_steps ==
    global_batch (per process), from starting_batch_size (default: the whole global batch) down
    through the divisors of global_batch, one step down after each out-of-memory (bsplan's
    classification: an error that is not one is raised at once, as the caller's). Usable as
    @find_executable_batch_size(global_batch=G) or find_executable_batch_size(f, global_batch=G)."""
    if global_batch < 1:
        raise BadInput(f"global_batch must be at least 1, not {global_batch}")
    divisors = [size for size in range(global_batch, 0, -1) if global_batch % size == 0]
    start = starting_batch_size or global_batch
    sizes = [size for size in divisors if size <= start]
    if not sizes:
        raise BadInput(f"starting_batch_size must be at least 1, not {starting_batch_size}")

    def decorate(inner: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(inner)
        def run(*args: Any, **kwargs: Any) -> T:
            for size in sizes:
                try:
                    return inner(size, global_batch // size, *args, **kwargs)
                except Exception as error:
                    if classify(error) is Failure.OTHER or size == 1:
                        raise
                    del error  # its frames hold the failed attempt's tensors
                    gc.collect()
                    return_freed_memory()
                    cuda.empty_cache()
            raise AssertionError("unreachable: batch size 1 either returned or raised")
        return run

    return decorate if function is None else decorate(function)
