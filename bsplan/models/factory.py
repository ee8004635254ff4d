"""A factory (`MODULE:CALLABLE`, such as `mypkg.models:build`) as a model file: the callable builds the
model, the command line describes its input. Anything a factory cannot say (a custom batch, a loss
of its own) is what a model file is for (docs/model-file.md)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from types import SimpleNamespace
from typing import Any, Callable

import torch

from bsplan.models.source import ModelSource
from bsplan.planning.errors import BadInput, UserCodeError, first_line


def resolve(text: str) -> Callable[[], Any]:
    """The callable MODULE:NAME names, imported as `python -c 'import MODULE'` would from here."""
    module_name, _, attribute = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise BadInput(f"cannot import {module_name} for {text}: {first_line(error)}") from None
        raise UserCodeError(f"importing {module_name} raised ModuleNotFoundError: {first_line(error)}", traceback.format_exc()) from None
    except Exception as error:  # the module's own code failed as it was imported: its traceback is the user's
        raise UserCodeError(f"importing {module_name} raised {type(error).__name__}: {first_line(error)}",
                            traceback.format_exc()) from None
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise BadInput(f"{module_name} has no {attribute}, which {text} names")
        target = getattr(target, name)
    if not callable(target):
        raise BadInput(f"{text} is not callable: give a function or class that returns a torch.nn.Module")
    return target  # type: ignore[no-any-return]


def functions(source: ModelSource) -> SimpleNamespace:
    """build_model, make_batch and, with --num-classes, compute_loss: a model file's functions."""
    build = resolve(source.text)

    def make_batch(batch_size: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if source.vocab is not None:
            inputs = torch.randint(0, source.vocab, (batch_size, source.seq_len))  # type: ignore[arg-type]
        else:
            inputs = torch.randn(batch_size, *source.input_shape)  # type: ignore[misc]
        if source.num_classes is None:
            return inputs
        return inputs, torch.randint(0, source.num_classes, (batch_size,))

    def compute_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, target = batch
        output = model(inputs)
        logits = getattr(output, "logits", output)
        return torch.nn.functional.cross_entropy(logits, target)

    namespace = SimpleNamespace(build_model=build, make_batch=make_batch)
    if source.num_classes is not None:
        namespace.compute_loss = compute_loss
    return namespace
