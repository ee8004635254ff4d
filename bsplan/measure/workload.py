"""Loads a model source (a model file, docs/model-file.md; a Hugging Face config or a factory,
docs/sources.md) into a Workload: what a probe trial runs.

A file is executed as a module, like pytest runs a test file, with its folder on sys.path so it
can import its neighbours. Everything the user wrote is called through here, so a failure in
their code is reported as theirs, with their traceback, and never mistaken for out-of-memory.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import torch

from bsplan.measure.oom import Failure, classify
from bsplan.models import knobs
from bsplan.models.source import ModelSource, SourceKind
from bsplan.planning.errors import BadInput, BsplanError, UserCodeError, first_line
from bsplan.planning.results import ModelInfo

Batch = Any  # a tensor, a tuple/list of tensors, or a dict of tensors
_BSPLAN_DIR = str(Path(__file__).resolve().parent.parent)  # the package, every layer of it


def user_traceback(error: BaseException) -> str:
    """The traceback from the first frame outside bsplan: what the user needs to fix their code."""
    frames = traceback.extract_tb(error.__traceback__)
    while frames and frames[0].filename.startswith(_BSPLAN_DIR):
        frames.pop(0)
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    return "".join(lines + traceback.format_exception_only(type(error), error))


def user_error(what: str, error: BaseException) -> UserCodeError:
    return UserCodeError(f"{what} raised {type(error).__name__}: {first_line(error)}", user_traceback(error))


@dataclass(frozen=True)
class Workload:
    """The model's functions (a model file's, or those made for a source), with the defaults
    docs/model-file.md gives for the optional ones, and the source's knobs applied."""

    source: ModelSource
    module: ModuleType | SimpleNamespace

    @property
    def name(self) -> str:
        return self.source.text

    @property
    def seq_len(self) -> int | None:
        """Tokens per sample: --seq-len, or the length a Hugging Face config's batch is made at."""
        return self.source.seq_len or getattr(self.module, "seq_len", None)

    def info(self, model: torch.nn.Module, has_batchnorm: bool) -> ModelInfo:
        """The model as a result describes it (its local shard's parameters under FSDP count whole)."""
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        settings = self.source.settings()
        task = getattr(self.module, "task", None)
        if task is not None:
            settings = {"task": task.value, **settings}
        return ModelInfo(self.name, total, has_batchnorm, self.seq_len, None if trainable == total else trainable, settings)

    def _function(self, name: str) -> Callable[..., Any] | None:
        return getattr(self.module, name, None)

    def build_model(self) -> torch.nn.Module:
        try:
            model = self._function("build_model")()  # type: ignore[misc]
        except BsplanError:
            raise  # bsplan's own sentence (a Hugging Face config it cannot build), not the user's code
        except Exception as error:
            if classify(error) is not Failure.OTHER:
                raise  # out of memory: the caller reports that the model does not fit
            raise user_error(f"build_model() in {self.name}", error) from None
        if not isinstance(model, torch.nn.Module):
            raise BadInput(f"build_model() in {self.name} returned {type(model).__name__}, not a torch.nn.Module")
        return knobs.apply(model, self.source)

    def make_batch(self, batch_size: int, device: torch.device) -> Batch:
        """The user's batch, checked and moved to the device (the copy counts, as on a real run)."""
        make = self._function("make_batch")
        takes_length = self.source.kind in (SourceKind.file, SourceKind.callables) and self.source.seq_len is not None
        batch = make(batch_size, self.source.seq_len) if takes_length else make(batch_size)  # type: ignore[misc]
        if not _is_batch(batch):
            raise BadInput(
                f"make_batch({batch_size}) in {self.name} returned {type(batch).__name__}: "
                "it must return a tensor, a tuple/list of tensors or a dict of tensors"
            )
        return _to_device(batch, device)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        custom = self._function("compute_loss")
        loss = custom(model, batch) if custom else default_loss(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            where = "compute_loss()" if custom else "the model's output"
            raise BadInput(f"{where} in {self.name} must give a scalar loss tensor, got {_describe(loss)}")
        return loss

    def shard_policy(self) -> Callable[[torch.nn.Module], Any] | None:
        """The file's own `shard_model(model)` for FSDP (docs/model-file.md), when it defines one."""
        return self._function("shard_model")

    def optimizer(self, parameters: Any) -> torch.optim.Optimizer:
        if self.source.optimizer is not None:  # asked for in place of the file's (bsplan routes)
            return _OPTIMIZERS[self.source.optimizer](parameters)
        custom = self._function("build_optimizer")
        optimizer = custom(parameters) if custom else torch.optim.AdamW(parameters)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise BadInput(f"build_optimizer() in {self.name} returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        return optimizer


_OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": lambda parameters: torch.optim.SGD(parameters, lr=0.01, momentum=0.9),
    "adafactor": lambda parameters: torch.optim.Adafactor(parameters),
}


def load_workload(source: ModelSource | Path | str) -> Workload:
    """The workload of a source: a model file imported and checked, or the functions made for a
    Hugging Face config or a factory."""
    source = source if isinstance(source, ModelSource) else ModelSource(str(source))
    if source.kind is SourceKind.hf:
        from bsplan.models import huggingface

        return Workload(source, huggingface.functions(source))
    if source.kind is SourceKind.factory:
        from bsplan.models import factory

        return Workload(source, factory.functions(source))
    given = source.callables
    module = _import_file(source.path) if given is None else SimpleNamespace(**given.functions())
    _check_length_argument(module, source)
    return Workload(source, module)


def _import_file(path: Path) -> ModuleType:
    """Import the model file and check that it defines what a probe needs."""
    if not path.is_file():
        raise BadInput(f"model file {path} does not exist" if not path.exists() else f"{path} is not a file")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"bsplan_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise BadInput(f"cannot load {path} as Python: give a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise user_error(f"importing {path}", error) from None
    for name in ("build_model", "make_batch"):
        if not callable(getattr(module, name, None)):
            raise BadInput(f"{path} does not define {name}(), which bsplan needs (see docs/model-file.md)")
    for name in ("compute_loss", "build_optimizer", "shard_model"):
        if hasattr(module, name) and not callable(getattr(module, name)):
            raise BadInput(f"{name} in {path} is not a function")
    return module


def _check_length_argument(module: ModuleType | SimpleNamespace, source: ModelSource) -> None:
    """make_batch(batch_size, seq_len) takes --seq-len; make_batch(batch_size) cannot."""
    try:
        parameters = list(inspect.signature(module.make_batch).parameters.values())
    except (TypeError, ValueError):
        return  # a builtin or a C function: called as given
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_two = len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)
    required_two = len([p for p in positional if p.default is p.empty]) >= 2
    if source.seq_len is not None and not takes_two:
        raise BadInput(f"--seq-len needs make_batch(batch_size, seq_len) in {source.text}: its make_batch takes only the "
                       "batch size (docs/model-file.md)")
    if source.seq_len is None and required_two:
        raise BadInput(f"make_batch in {source.text} takes a sequence length: give --seq-len")


def default_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Call the model with the batch; use `.loss` if the output has one, else its mean."""
    if isinstance(batch, dict):
        output = model(**batch)
    elif isinstance(batch, (tuple, list)):
        output = model(*batch)
    else:
        output = model(batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is not None:
        return loss
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise BadInput(f"the model returned {_describe(output)}: define compute_loss(model, batch) in the model file")
    return output.float().mean()


def _is_batch(batch: Batch) -> bool:
    if isinstance(batch, torch.Tensor):
        return True
    if isinstance(batch, (tuple, list)):
        return bool(batch) and all(isinstance(item, torch.Tensor) for item in batch)
    if isinstance(batch, dict):
        return bool(batch) and all(isinstance(item, torch.Tensor) for item in batch.values())
    return False


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: value.to(device) for key, value in batch.items()}
    return type(batch)(item.to(device) for item in batch)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
