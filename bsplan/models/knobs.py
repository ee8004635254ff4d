"""The knobs that change a built model's memory: activation checkpointing (activations recomputed in
backward instead of saved), LoRA adapters (only the adapters train, so gradients and optimizer state
shrink; activations do not) and mixed precision (bf16 weights and gradients, fp32 master weights)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterable, Iterator

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


def to_bf16(model: torch.nn.Module) -> None:
    """The model's floating-point parameters and buffers in bf16, ties kept, for `--precision mixed`.
    Each is replaced rather than converted in place as Module.to() converts it: a fake tensor's
    Module.to() swaps the tensor object, which fails on the fake mode's own references. Those in bf16
    already are left as they are, so a model cast before a wrapper took its parameters stays whole."""
    cast: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.bfloat16:
                    continue
                if id(tensor) not in cast:
                    half = tensor.detach().to(torch.bfloat16)
                    is_parameter = table is module._parameters
                    cast[id(tensor)] = torch.nn.Parameter(half, tensor.requires_grad) if is_parameter else half
                table[name] = cast[id(tensor)]


class MasterWeights(torch.optim.Optimizer):
    """`--precision mixed`: bf16 weights trained through fp32 master copies, as DeepSpeed's and
    Megatron-LM's bf16 optimizers train them. The inner optimizer steps the masters on the gradients
    cast up to fp32, and the weights are copied back down. Its state is the inner optimizer's, keyed by
    the masters, and the masters are state too: 2 + 2 + 12 bytes per parameter with Adam (Rajbhandari
    et al. 2019, ZeRO, arXiv:1910.02054, section 3.1)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        self.weights = [parameter for parameter in parameters if parameter.requires_grad]
        self.masters = [torch.nn.Parameter(weight.detach().to(torch.float32, copy=True)) for weight in self.weights]
        self.inner = optimizer(self.masters)
        super().__init__(self.masters, {})
        self.state, self.param_groups = self.inner.state, self.inner.param_groups

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for weight, master in zip(self.weights, self.masters):
            master.grad = None if weight.grad is None else weight.grad.float()
        self.inner.step()
        for weight, master in zip(self.weights, self.masters):
            weight.copy_(master)
            master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for weight in self.weights:
            weight.grad = None


def kept_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What an optimizer keeps from step to step: its state, and MasterWeights' fp32 copies."""
    values = [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    return values + (optimizer.masters if isinstance(optimizer, MasterWeights) else [])
