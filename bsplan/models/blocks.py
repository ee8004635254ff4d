"""A model's repeated blocks: what activation checkpointing recomputes one by one and what FSDP
shards as its units. One rule for both, and for what FSDP holds gathered (planning/strategies.py).
Reads names, ids and shapes only, so the model may be fake (a traced step)."""

from __future__ import annotations

import torch


def largest_block_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The nn.ModuleList holding the most parameters: a model's repeated layers."""
    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList) and _parameter_count(module)]
    return max(lists, key=_parameter_count, default=None)


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules the default FSDP policy shards on their own, children before parents (each
    unit takes what its children left). As the ecosystem's wrapping policies do: a Hugging Face
    model's repeated blocks (the classes its `_no_split_modules` names), else the blocks of the
    largest nn.ModuleList, else each submodule that holds parameters. A unit never holds a
    parameter that is also reachable from outside it (tied embeddings: FSDP2 refuses a parameter
    in two units), so such a candidate stays in the root's unit. Reads names, ids and shapes
    only: the model may be fake (measure/trace.py)."""
    # torch's MultiheadAttention reads out_proj.weight without calling out_proj, so out_proj's own
    # unit would never be gathered: it stays in its parent's unit.
    inside_attention = {
        id(child) for attention in model.modules() if isinstance(attention, torch.nn.MultiheadAttention)
        for child in attention.modules() if child is not attention
    }
    modules = [module for module in model.modules() if module is not model and id(module) not in inside_attention]
    blocks = {name for module in model.modules() for name in _class_names(getattr(module, "_no_split_modules", None))}
    candidates = [module for module in modules if type(module).__name__ in blocks]
    if not candidates:
        largest = largest_block_list(model)
        children = {id(child) for child in largest.children()} if largest is not None else set()
        candidates = [module for module in modules if id(module) in children]
    if not candidates:
        candidates = [module for module in modules if any(True for _ in module.parameters(recurse=False))]
    # Every path by which the model reaches a parameter, and every path by which it reaches a module.
    parameter_paths: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        parameter_paths.setdefault(id(parameter), []).append(name)
    module_paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_paths.setdefault(id(module), []).append(f"{name}.")

    def self_contained(unit: torch.nn.Module) -> bool:
        inside = tuple(module_paths[id(unit)])
        return all(path.startswith(inside) for parameter in unit.parameters() for path in parameter_paths[id(parameter)])

    units = [module for module in candidates if _parameter_count(module) and self_contained(module)]
    return units[::-1]  # model.modules() lists a parent before its children


def _class_names(value: object) -> list[str]:
    """A `_no_split_modules` as class names: transformers gives a list or a set of them, or None."""
    return [name for name in value if isinstance(name, str)] if isinstance(value, (list, tuple, set, frozenset)) else []


def _parameter_count(module: torch.nn.Module) -> int:
    """Parameters in the module, each once: numel is a shape's, so a fake tensor has one too."""
    return sum(parameter.numel() for parameter in module.parameters())
