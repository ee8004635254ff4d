"""fit_batch on a Hugging Face Trainer: the per-device batch from bsplan's probe of the Trainer's own
model and collator, and the accumulation that keeps the global batch; the Trainer then trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MODELS

transformers = pytest.importorskip("transformers")

import bsplan  # noqa: E402
from bsplan.integrations.transformers import fit_batch  # noqa: E402

LIMIT = 24 * 2**20
TOKENS = 32


def _trainer(tmp_path: Path, **arguments: object) -> transformers.Trainer:
    config = transformers.AutoConfig.from_pretrained(MODELS / "hf" / "llama-tiny")
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, config.vocab_size, (256, TOKENS), generator=generator)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                                          gradient_accumulation_steps=1, save_strategy="no", **arguments)
    return transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=transformers.default_data_collator)


def _exact() -> int:
    """The same model and batch as plain callables: bsplan's probe of them."""
    config = transformers.AutoConfig.from_pretrained(MODELS / "hf" / "llama-tiny")
    result = bsplan.probe(lambda: transformers.AutoModelForCausalLM.from_config(config),
                          lambda b: {"input_ids": (ids := torch.randint(0, config.vocab_size, (b, TOKENS))), "labels": ids},
                          device="cpu", memory_limit=LIMIT)
    assert result.max_batch is not None
    return result.max_batch


def test_fit_batch_sets_the_largest_batch_and_keeps_the_global_batch(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=1)
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    result = fit_batch(trainer, global_batch=1024, memory_limit=LIMIT)
    largest = _exact()
    assert result.max_batch == largest
    args = trainer.args
    assert args.per_device_train_batch_size <= largest
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 1024
    assert all(torch.equal(before[name], value) for name, value in trainer.model.state_dict().items())
    # The Trainer trains with that batch: its own DataLoader makes batches of it.
    assert next(iter(trainer.get_train_dataloader()))["input_ids"].shape[0] == args.per_device_train_batch_size
    assert trainer.train().global_step == 1
