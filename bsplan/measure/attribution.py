"""What the tensors at a traced step's peak are: parameters and buffers, gradients, optimizer state,
activations saved for backward, temporaries; and which modules saved the activations.

One more traced trial at the batch, counted by the same TensorBytesLimit, with an observer that
labels each storage as it is first counted, by the phase of the step that made it (the trial
runner says when each begins), relabels those that autograd saves for backward (a saved-tensors
hook, which also names the module whose forward was running) and those that become a parameter's
gradient (a post-accumulate-grad hook), and keeps the labels of the live storages each time the
peak rises. The labels kept last are the peak's: they add up to it, byte for byte.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from bsplan.backends.cpu import tensor_storages
from bsplan.backends.fake import FakeDevice
from bsplan.measure.options import ProbeOptions
from bsplan.measure.trial import TrialRunner
from bsplan.measure.workload import load_workload
from bsplan.models.knobs import kept_tensors
from bsplan.models.source import SourceLike
from bsplan.planning.errors import BsplanError
from bsplan.planning.results import ModuleBytes, PeakComposition

TOP_MODULES = 10
OUTSIDE_MODULES = "<outside any module>"  # saved where no module's forward runs: a loss computed in the model file
# What a storage made in each phase of the step is, unless autograd saves it or it becomes a gradient.
# The optimizer's state is told from its step's temporaries once the step is over (_Labels.enter).
_MADE_IN = {"parameters": "parameters", "optimizer": "temporaries", "forward": "temporaries", "backward": "temporaries"}


class _Label:
    """What one storage is, changed in place as the step learns more: the peak keeps these objects,
    so a storage that becomes a gradient or is saved for backward after the peak was set (the
    allocation that set it, say) is told right."""

    __slots__ = ("kind", "module")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.module = ""  # the module whose forward saved it for backward


class _Labels:
    """The observer of the counting (backends/cpu.py StorageObserver) and the hooks' target."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names  # id(module) -> qualified name in the model (the model itself: <its class>)
        self.phase = "parameters"  # the model is built first
        self.labels: dict[int, _Label] = {}  # live storage key -> what it is
        self.running: list[str] = []  # the modules whose forward runs, innermost last
        self.at_peak: list[tuple[int, _Label]] = []  # (bytes, label) of each live storage at the peak
        self.optimizer: Callable[[], torch.optim.Optimizer | None] = lambda: None

    def counted(self, key: int) -> None:
        self.labels[key] = _Label(_MADE_IN[self.phase])

    def peaked(self, live: dict[int, tuple[Any, int]]) -> None:
        self.at_peak = [(size, self._label(key)) for key, (_, size) in live.items()]

    def _label(self, key: int) -> _Label:
        return self.labels.setdefault(key, _Label("temporaries"))

    def enter(self, phase: str) -> None:
        optimizer = self.optimizer()
        if self.phase == "optimizer" and optimizer is not None:  # what the step keeps is its state
            for value in kept_tensors(optimizer):
                for storage in tensor_storages(value):
                    self._label(id(storage)).kind = "optimizer_state"
        self.phase = phase

    def saved(self, tensor: torch.Tensor) -> torch.Tensor:
        for storage in tensor_storages(tensor):
            label = self._label(id(storage))
            if label.kind == "temporaries":  # not a parameter, its gradient or optimizer state
                label.kind, label.module = "activations", self.running[-1] if self.running else OUTSIDE_MODULES
        return tensor

    def gradient(self, parameter: torch.Tensor) -> None:
        if parameter.grad is not None:
            for storage in tensor_storages(parameter.grad):
                self._label(id(storage)).kind = "gradients"

    def forward_begins(self, module: torch.nn.Module, _inputs: Any) -> None:
        self.running.append(self.names.get(id(module), type(module).__name__))

    def forward_ends(self, _module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
        if self.running:
            self.running.pop()


def compose_peak(model_source: SourceLike, options: ProbeOptions, batch: int, limit_bytes: int) -> PeakComposition:
    """The live tensors at the peak of a traced trial of `batch` (its last step's), by kind, with the
    modules that saved the most activation bytes."""
    workload = load_workload(model_source)
    device = FakeDevice(limit_bytes, "traced")
    with device.tracking():
        model = device.place(workload.build_model())
        model.train(options.mode == "train")
        names = {id(module): name for name, module in model.named_modules()}
        labels = _Labels({**names, id(model): f"<{type(model).__name__}>"})
        device.counter.observer = labels
        for key in (id(storage) for tensor in [*model.parameters(), *model.buffers()] for storage in tensor_storages(tensor)):
            labels.labels[key] = _Label("parameters")  # built before the observer was set
        runner = TrialRunner(workload, model, device, steps=options.steps, precision=options.precision, mode=options.mode,
                             on_phase=labels.enter)
        labels.optimizer = lambda: runner.optimizer
        with _hooks(model, labels):
            trial = runner(batch)
    if not trial.fits:
        raise BsplanError(f"the traced trial of batch {batch} did not fit a second time ({trial.error})")
    return _composition(batch, labels.at_peak)


@contextlib.contextmanager
def _hooks(model: torch.nn.Module, labels: _Labels) -> Iterator[None]:
    handles = [register_module_forward_pre_hook(labels.forward_begins), register_module_forward_hook(labels.forward_ends)]
    handles += [p.register_post_accumulate_grad_hook(labels.gradient) for p in model.parameters() if p.requires_grad]
    try:
        with saved_tensors_hooks(labels.saved, lambda tensor: tensor):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _composition(batch: int, at_peak: list[tuple[int, _Label]]) -> PeakComposition:
    kinds = dict.fromkeys(("parameters", "gradients", "optimizer_state", "activations", "temporaries"), 0)
    modules: dict[str, int] = {}
    for size, label in at_peak:
        kinds[label.kind] += size
        if label.kind == "activations":
            modules[label.module] = modules.get(label.module, 0) + size
    top = sorted(modules.items(), key=lambda item: (-item[1], item[0]))[:TOP_MODULES]
    return PeakComposition(
        batch=batch, peak_bytes=sum(kinds.values()), parameter_bytes=kinds["parameters"], gradient_bytes=kinds["gradients"],
        optimizer_state_bytes=kinds["optimizer_state"], activation_bytes=kinds["activations"],
        temporary_bytes=kinds["temporaries"], top_modules=tuple(ModuleBytes(name, size) for name, size in top),
    )
