"""The fine-tuning knobs that change a built model's memory: activation checkpointing (activations
recomputed in backward instead of saved) and LoRA adapters (only the adapters train, so gradients
and optimizer state shrink; activations do not)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from bsplan.models.blocks import largest_block_list
from bsplan.models.source import ModelSource
from bsplan.planning.errors import BadInput, first_line


def apply(model: torch.nn.Module, source: ModelSource) -> torch.nn.Module:
    """The model with the knobs the source asks for."""
    if source.gradient_checkpointing:
        checkpoint_blocks(model, source.text)
    if source.lora is not None:
        model = with_lora(model, source)
    return model


def checkpoint_blocks(model: torch.nn.Module, name: str) -> None:
    """A Hugging Face model's own gradient checkpointing; elsewhere, each block of the model's largest
    nn.ModuleList (its repeated layers) recomputed in backward, non-reentrant as torch recommends."""
    if getattr(model, "supports_gradient_checkpointing", False):
        newer = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name; 4.x has the older only
        if callable(newer):
            newer(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    blocks = largest_block_list(model)
    if blocks is None:
        raise BadInput(f"--gradient-checkpointing is not supported for {name}: it has no list of repeated blocks "
                       "(an nn.ModuleList) to checkpoint; checkpoint in your own model code instead")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)  # type: ignore[method-assign]


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def with_lora(model: torch.nn.Module, source: ModelSource) -> torch.nn.Module:
    """The model wrapped by peft with LoRA adapters: its base weights frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise BadInput("--lora needs peft: pip install 'bsplan[hf]'") from None
    lora = source.lora
    assert lora is not None
    targets = list(lora.targets) if lora.targets else None
    try:
        with _adapters_left_in_place_when_traced(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks transformers by its deprecated names
            return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=targets))  # type: ignore[no-any-return]
    except ValueError as error:  # peft's sentence: no default targets for the architecture, or none matched
        detail = first_line(error)
        raise BadInput(f"--lora on {source.text}: {detail} (name the modules to adapt: --lora r={lora.r},targets=a+b)") from None


@contextlib.contextmanager
def _adapters_left_in_place_when_traced() -> Iterator[None]:
    """Where tensors are fake (a traced step), a module's .to() that changes nothing returns it as it
    is while peft adds the adapters: peft moves each new adapter to its base layer's device and dtype,
    where they already are, and torch swaps a fake parameter on every .to(), a swap that fails on the
    fake mode's own references. A .to() that does change a device or a dtype still runs."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(torch.empty(0), FakeTensor):
        yield
        return
    original = torch.nn.Module.to

    def to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        same_device = device is None or all(t.device == device for t in tensors)
        same_dtype = dtype is None or all(t.dtype == dtype for t in tensors if t.is_floating_point())
        return module if same_device and same_dtype else original(module, *args, **kwargs)

    torch.nn.Module.to = to  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.nn.Module.to = original  # type: ignore[method-assign]
