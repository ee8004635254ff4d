"""A model source as the command line gives it, checked, with no torch: what a probe, an estimate and
each of their trial processes load the same model from (it is picklable)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Union

from bsplan.planning.errors import BadInput

HF_PREFIX = "hf:"
# Optimizers a source may be trained with instead of its own (measure/workload.py builds them):
# torch's AdamW and SGD with momentum 0.9, and Adafactor (factored second moments, no first moment).
OPTIMIZERS = ("adamw", "sgd", "adafactor")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # package.module:function (or Class, or obj.method)


class SourceKind(str, Enum):
    file = "file"  # a model file with build_model() and make_batch() (docs/model-file.md)
    hf = "hf"  # a Hugging Face config, built randomly initialised (docs/sources.md)
    factory = "factory"  # MODULE:CALLABLE returning an nn.Module, its input described by options
    callables = "callables"  # Python functions given to bsplan.probe(...) (docs/api.md)


class Task(str, Enum):
    """The head a Hugging Face config is built with, and so the batch and the loss."""

    causal_lm = "causal-lm"
    masked_lm = "masked-lm"
    seq2seq_lm = "seq2seq-lm"
    sequence_classification = "sequence-classification"
    image_classification = "image-classification"


@dataclass(frozen=True)
class Lora:
    """LoRA adapters (peft): rank, scaling alpha, the module names they wrap (None: peft's default
    for the architecture)."""

    r: int
    alpha: int
    targets: tuple[str, ...] | None = None

    def __str__(self) -> str:
        targets = "" if self.targets is None else f",targets={'+'.join(self.targets)}"
        return f"r={self.r},alpha={self.alpha}{targets}"


@dataclass(frozen=True)
class Callables:
    """A model given as Python functions (bsplan.probe, bsplan.estimate): what a model file defines.
    A probe whose trials run in other processes sends them by reference: module-level functions."""

    build_model: Callable[[], Any]
    make_batch: Callable[..., Any]
    compute_loss: Callable[[Any, Any], Any] | None = None
    build_optimizer: Callable[[Any], Any] | None = None

    def functions(self) -> dict[str, Callable[..., Any]]:
        """Those given, by the model file's names."""
        return {item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) is not None}


@dataclass(frozen=True)
class ModelSource:
    """One model, as given: the text and every option that shapes its memory."""

    text: str
    seq_len: int | None = None  # tokens per sample
    task: Task | None = None  # hf: the head (None: from the config's architectures)
    trust_remote_code: bool = False
    target_len: int | None = None  # hf seq2seq: decoder tokens per sample (None: seq_len)
    input_shape: tuple[int, ...] | None = None  # factory: one sample of a float input
    vocab: int | None = None  # factory: token ids below this, seq_len per sample
    num_classes: int | None = None  # factory: a class target per sample, cross-entropy loss
    gradient_checkpointing: bool = False
    lora: Lora | None = None
    attn: str | None = None  # hf: attn_implementation (sdpa, eager)
    optimizer: str | None = None  # one of OPTIMIZERS in place of the model file's (None: the file's, else AdamW)
    callables: Callables | None = None  # the model as Python functions; text then names them

    @property
    def kind(self) -> SourceKind:
        if self.callables is not None:
            return SourceKind.callables
        if self.text.startswith(HF_PREFIX):
            return SourceKind.hf
        if _FACTORY.match(self.text) and not Path(self.text).exists():
            return SourceKind.factory
        return SourceKind.file

    @property
    def path(self) -> Path:
        """The model file."""
        return Path(self.text)

    def __str__(self) -> str:
        return self.text

    def at(self, seq_len: int | None) -> ModelSource:
        """The same model at another sequence length (a sweep's rows)."""
        return replace(self, seq_len=seq_len)

    def settings(self) -> dict[str, object]:
        """What was asked beyond the source itself, for the result: none of it when left at its default
        (a Hugging Face source adds the task it resolved, measure/workload.py)."""
        values = {"task": self.task.value if self.task else None, "target_len": self.target_len,
                  "gradient_checkpointing": self.gradient_checkpointing or None,
                  "lora": str(self.lora) if self.lora else None, "attn": self.attn, "optimizer": self.optimizer}
        return {key: value for key, value in values.items() if value is not None}

    def __post_init__(self) -> None:
        kind = self.kind
        if kind is not SourceKind.hf:
            for option, value in (("--task", self.task), ("--target-len", self.target_len), ("--attn", self.attn)):
                if value is not None:
                    raise BadInput(f"{option} applies to hf: sources, not to {self.text}")
            if self.trust_remote_code:
                raise BadInput(f"--trust-remote-code applies to hf: sources, not to {self.text}")
        if kind is not SourceKind.factory:
            for option, value in (("--input-shape", self.input_shape), ("--vocab", self.vocab), ("--num-classes", self.num_classes)):
                if value is not None:
                    raise BadInput(f"{option} describes the input of a MODULE:CALLABLE factory, not of {self.text}")
        elif self.input_shape is None and self.vocab is None:
            raise BadInput(f"describe the input of {self.text}: --input-shape C,H,W for a float tensor, or --vocab N --seq-len L "
                           "for token ids")
        elif self.input_shape is not None and self.vocab is not None:
            raise BadInput("give --input-shape or --vocab, not both: a factory's model takes one input")
        elif self.vocab is not None and self.seq_len is None:
            raise BadInput("--vocab needs --seq-len: the tokens per sample")
        elif self.vocab is None and self.seq_len is not None:
            raise BadInput(f"--seq-len applies to token ids (--vocab), not to the float input of {self.text}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise BadInput(f"unknown optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        for option, value in (("--seq-len", self.seq_len), ("--target-len", self.target_len), ("--vocab", self.vocab),
                              ("--num-classes", self.num_classes)):
            if value is not None and value < 1:
                raise BadInput(f"{option} must be at least 1, not {value}")


def parse_seq_lens(text: str | None) -> tuple[int, ...] | None:
    """--seq-len: one length, or a comma list to sweep (each at least 1, none twice), in the order given."""
    if text is None:
        return None
    lengths = tuple(_positive(part, "--seq-len") for part in text.split(","))
    if len(set(lengths)) != len(lengths):
        raise BadInput(f"--seq-len {text} names a length twice")
    return lengths


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """--input-shape 3,224,224: one sample's shape."""
    return None if text is None else tuple(_positive(part, "--input-shape") for part in text.split(","))


def parse_lora(text: str | None) -> Lora | None:
    """--lora r=16[,alpha=32,targets=q_proj+v_proj]: alpha defaults to 2 r, as is common."""
    if text is None:
        return None
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("r", "alpha", "targets") or not value.strip():
            raise BadInput(f"--lora {text}: give r=N[,alpha=N,targets=name+name], e.g. r=16,alpha=32,targets=q_proj+v_proj")
        fields[key.strip()] = value.strip()
    if "r" not in fields:
        raise BadInput(f"--lora {text} needs the rank: r=N")
    r = _positive(fields["r"], "--lora r")
    targets = tuple(name.strip() for name in fields["targets"].split("+")) if "targets" in fields else None
    if targets is not None and not all(targets):
        raise BadInput(f"--lora {text}: targets names modules joined by +, such as q_proj+v_proj")
    return Lora(r, _positive(fields.get("alpha", str(2 * r)), "--lora alpha"), targets)


def _positive(text: str, option: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise BadInput(f"{option} takes whole numbers, not {text.strip()!r}") from None
    if value < 1:
        raise BadInput(f"{option} must be at least 1, not {value}")
    return value


SourceLike = Union[ModelSource, Path]  # a bare path is a model file (scripts and tests pass one)


def from_cli(text: str, *, seq_len: str | None, task: str | None, trust_remote_code: bool, target_len: int | None,
             input_shape: str | None, vocab: int | None, num_classes: int | None, gradient_checkpointing: bool,
             lora: str | None, attn: str | None) -> tuple[ModelSource, tuple[int, ...] | None]:
    """The source the command line names, at its first --seq-len, and every length when it sweeps."""
    lengths = parse_seq_lens(seq_len)
    chosen = None if task is None else _task(task)
    source = ModelSource(
        text, seq_len=lengths[0] if lengths else None, task=chosen, trust_remote_code=trust_remote_code, target_len=target_len,
        input_shape=parse_shape(input_shape), vocab=vocab, num_classes=num_classes,
        gradient_checkpointing=gradient_checkpointing, lora=parse_lora(lora), attn=attn,
    )
    return source, lengths if lengths and len(lengths) > 1 else None


def _task(text: str) -> Task:
    try:
        return Task(text)
    except ValueError:
        raise BadInput(f"unknown --task {text!r}: choose from {', '.join(task.value for task in Task)}") from None
