"""The options that describe a model source, shared by probe, estimate and routes (docs/sources.md),
and the source they describe. No torch here: the source is checked before anything imports it."""

from __future__ import annotations

from typing import Any

import typer

from bsplan.planning.errors import BadInput

# What probe and estimate accept as the model, and the options that describe a source (docs/sources.md).
MODEL_HELP = ("A model file defining build_model() and make_batch(batch_size) (docs/model-file.md); hf:CONFIG, a Hugging Face "
              "config (a directory, a config.json or a hub id; random weights, never downloaded); or MODULE:CALLABLE, a factory "
              "returning an nn.Module (describe its input with --input-shape or --vocab).")
SEQ_LEN = typer.Option(None, help="Tokens per sample (hf:, a factory with --vocab, a model file whose make_batch takes "
                                  "(batch_size, seq_len)). A comma list sweeps: 512,1024,2048.")
TASK = typer.Option(None, help="hf: the head: causal-lm, masked-lm, seq2seq-lm, sequence-classification, image-classification. "
                               "Default: from the config's architectures.")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="hf: run the model code a hub config ships with it.")
TARGET_LEN = typer.Option(None, help="hf seq2seq-lm: decoder tokens per sample (default: --seq-len).")
INPUT_SHAPE = typer.Option(None, help="MODULE:CALLABLE: one sample of a float input, e.g. 3,224,224.")
VOCAB = typer.Option(None, help="MODULE:CALLABLE: token ids below N as input, --seq-len of them per sample.")
NUM_CLASSES = typer.Option(None, help="MODULE:CALLABLE: a class target per sample and a cross-entropy loss (default: the output's mean).")
GRADIENT_CHECKPOINTING = typer.Option(
    False, "--gradient-checkpointing", help="Recompute activations in backward: hf models' own, else each block of the largest nn.ModuleList."
)
LORA = typer.Option(None, help="Train LoRA adapters only (peft): r=16[,alpha=32,targets=q_proj+v_proj].")
ATTN = typer.Option(None, help="hf: attention implementation, e.g. sdpa or eager.")
PLOT = typer.Option(None, help="Also draw the result as a chart: FILE.png or FILE.svg (needs pip install 'bsplan[plot]').")

# The parameters of a command that describe its model source, by their names in models/source.py from_cli.
SOURCE_OPTIONS = ("seq_len", "task", "trust_remote_code", "target_len", "input_shape", "vocab", "num_classes",
                  "gradient_checkpointing", "lora", "attn")


def source_from(model: str, values: dict[str, Any]) -> tuple[Any, tuple[int, ...] | None]:
    """The model source a command's options describe, and the lengths to sweep (None: one length)."""
    from bsplan.models.source import from_cli

    return from_cli(model, **{name: values[name] for name in SOURCE_OPTIONS})


def refuse_without_model(values: dict[str, Any]) -> None:
    """`estimate --params` counts model states alone: options that describe a model are refused."""
    given = [f"--{name.replace('_', '-')}" for name in SOURCE_OPTIONS if values[name] not in (None, False)]
    if given:
        verb = "describes" if len(given) == 1 else "describe"
        raise BadInput(f"{', '.join(given)} {verb} a model, which --params does without: it counts model states alone")
