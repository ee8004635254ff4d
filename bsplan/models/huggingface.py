"""A Hugging Face config as a model file: the model built from it with random weights (the memory of
the real ones, none of their download), and a batch synthesised from it that makes the model return
its own `.loss`. Needs transformers (the `hf` extra); peft for LoRA."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from bsplan.models.source import HF_PREFIX, ModelSource, Task
from bsplan.planning.errors import BadInput, first_line

# The head each task builds (transformers' Auto classes).
_AUTO = {
    Task.causal_lm: "AutoModelForCausalLM",
    Task.masked_lm: "AutoModelForMaskedLM",
    Task.seq2seq_lm: "AutoModelForSeq2SeqLM",
    Task.sequence_classification: "AutoModelForSequenceClassification",
    Task.image_classification: "AutoModelForImageClassification",
}
# A config's architectures name their head: LlamaForCausalLM, BertForMaskedLM, ViTForImageClassification.
_BY_SUFFIX = {
    "ForCausalLM": Task.causal_lm, "LMHeadModel": Task.causal_lm, "ForMaskedLM": Task.masked_lm,
    "ForConditionalGeneration": Task.seq2seq_lm, "ForSeq2SeqLM": Task.seq2seq_lm,
    "ForSequenceClassification": Task.sequence_classification, "ForImageClassification": Task.image_classification,
}
# Tokens per sample when --seq-len is not given: the config's longest, up to this many.
DEFAULT_SEQ_LEN = 2048


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise BadInput("hf: sources need transformers: pip install 'bsplan[hf]'") from None
    transformers.logging.set_verbosity_error()  # "a randomly initialised model" is what bsplan asks for
    return transformers


def load_config(source: ModelSource) -> Any:
    """The config: a local directory or config.json, else a hub id (config only, never weights)."""
    transformers = transformers_module()
    where = source.text[len(HF_PREFIX):]
    if not where:
        raise BadInput("hf: needs a config: hf:DIRECTORY, hf:path/config.json or hf:org/name")
    path = Path(where)
    local = path.exists()
    try:
        if local and path.is_file():
            import json

            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise BadInput(f"{path} holds no JSON object, so no Hugging Face config")
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise BadInput(f"{path} has no model_type, so no architecture to build")
            return transformers.AutoConfig.for_model(model_type, **data)
        return transformers.AutoConfig.from_pretrained(where, trust_remote_code=source.trust_remote_code,
                                                       local_files_only=not _hub_reachable())
    except BadInput:
        raise
    except Exception as error:  # noqa: BLE001 - transformers' own errors for a config it cannot read, each one sentence here
        message = first_line(error)
        if local:
            raise BadInput(f"cannot read the Hugging Face config at {where}: {message}") from None
        if "trust_remote_code" in message:
            raise BadInput(f"{where} defines its model in its own code: pass --trust-remote-code if you trust it") from None
        raise BadInput(f"no Hugging Face config {where!r}: not a local path, and the hub could not give it "
                       f"(offline, unreachable or unknown: {message})") from None


def _hub_reachable() -> bool:
    """Whether the hub's host resolves: where it does not (offline, a sandbox), only the local cache is
    asked, at once, instead of retrying the network for half a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443)
    except OSError:
        return False
    return True


def task_of(config: Any, asked: Task | None) -> Task:
    """The asked task, else the head the config's architectures name, else the model type's usual one."""
    if asked is not None:
        return asked
    for architecture in getattr(config, "architectures", None) or ():
        for suffix, task in _BY_SUFFIX.items():
            if architecture.endswith(suffix):
                return task
    if getattr(config, "is_encoder_decoder", False):
        return Task.seq2seq_lm
    if getattr(config, "image_size", None) and getattr(config, "vocab_size", None) is None:
        return Task.image_classification
    return Task.causal_lm


def seq_len_of(config: Any, source: ModelSource, task: Task) -> int | None:
    """Tokens per sample: --seq-len, else the config's longest up to DEFAULT_SEQ_LEN; None for images.
    Longer than the config's positions is refused (a learned position table has no row for it)."""
    if task is Task.image_classification:
        if source.seq_len is not None:
            raise BadInput(f"--seq-len does not apply to {source.text}: an image model's input is the config's image size")
        return None
    if source.target_len is not None and task is not Task.seq2seq_lm:
        raise BadInput(f"--target-len sets the decoder's tokens of a seq2seq-lm, not of a {task.value}")
    if getattr(config, "vocab_size", None) is None:
        raise BadInput(f"the config of {source.text} has no vocab_size, so no token ids to make a {task.value} batch from")
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    length = source.seq_len or min(longest or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    for what, value in (("--seq-len", length), ("--target-len", source.target_len)):
        if longest is not None and value is not None and value > longest:
            raise BadInput(f"{what} {value} is longer than the {longest} positions the config of {source.text} allows")
    return length


def functions(source: ModelSource) -> SimpleNamespace:
    """build_model and make_batch, as a model file defines them, from the config."""
    transformers = transformers_module()
    config = load_config(source)
    task = task_of(config, source.task)
    seq_len = seq_len_of(config, source, task)
    auto = getattr(transformers, _AUTO[task])
    options: dict[str, Any] = {"trust_remote_code": source.trust_remote_code}
    if source.attn is not None:
        options["attn_implementation"] = source.attn
    if task is Task.causal_lm or task is Task.seq2seq_lm:
        config.use_cache = False  # training keeps no key-value cache
    if task is Task.sequence_classification and getattr(config, "pad_token_id", None) is None:
        # A decoder's classification head reads the last token before padding; the batch has no padding.
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0

    def build_model() -> torch.nn.Module:
        try:
            with _values_skipped_when_traced(transformers):
                return auto.from_config(config, **options)  # type: ignore[no-any-return]
        except ValueError as error:  # transformers' sentence: an unknown architecture for this head, an attention it lacks
            raise BadInput(f"cannot build {source.text} as {task.value}: {first_line(error)}") from None

    def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
        if task is Task.image_classification:
            size = config.image_size
            pixels = torch.randn(batch_size, getattr(config, "num_channels", 3), size, size)
            return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (batch_size,))}
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len))  # type: ignore[arg-type]
        batch = {"input_ids": tokens}
        if task is Task.sequence_classification:
            batch["labels"] = torch.randint(0, config.num_labels, (batch_size,))
        elif task is Task.seq2seq_lm:
            batch["labels"] = torch.randint(0, config.vocab_size, (batch_size, source.target_len or seq_len))  # type: ignore[arg-type]
        else:
            batch["labels"] = tokens
        return batch

    def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with _one_sequence_per_sample(transformers):
            return model(**batch).loss  # type: ignore[no-any-return]

    return SimpleNamespace(build_model=build_model, make_batch=make_batch, compute_loss=compute_loss, seq_len=seq_len, task=task)


@contextlib.contextmanager
def _values_skipped_when_traced(transformers: Any) -> Iterator[None]:
    """transformers' own weight initialisation skipped where tensors are fake (a traced step): some
    initialisers read values (ViT's truncated normal), which fake tensors do not have, and values
    change no byte. Only the per-module initialiser is skipped: tying the input and output embeddings
    still runs, since it changes what is allocated. Real steps keep it all, so their numbers are
    those of a real model."""
    from torch._subclasses.fake_tensor import FakeTensor

    base = transformers.modeling_utils.PreTrainedModel
    original = getattr(base, "_initialize_weights", None)
    if original is None or not isinstance(torch.empty(0), FakeTensor):
        yield
        return
    base._initialize_weights = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        base._initialize_weights = original


@contextlib.contextmanager
def _one_sequence_per_sample(transformers: Any) -> Iterator[None]:
    """Tell transformers' masks that each sample is one sequence, as the synthetic batch makes it. It
    checks the position ids for packed sequences by reading their values, which a traced step's fake
    tensors do not have: there it assumes packing and builds a batch x seq x seq mask that the real
    step never builds (and, for grouped-query attention, copies of the keys and values), so the trace
    and the real step would count different bytes."""
    masking = getattr(transformers, "masking_utils", None)
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original
