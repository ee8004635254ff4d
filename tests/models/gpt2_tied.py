"""A tiny GPT-2 causal LM (transformers' GPT2LMHeadModel from a GPT2Config), whose output layer is
its input embedding (`lm_head.weight is transformer.wte.weight`): the tests of bsplan's default FSDP
policy, which must keep a tied parameter in one unit. Labels given so the model returns .loss.
Needs transformers (the tests skip without it)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

TOKENS = 32
CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)


def build_model() -> torch.nn.Module:
    return GPT2LMHeadModel(CONFIG)


def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, CONFIG.vocab_size, (batch_size, TOKENS))
    return {"input_ids": tokens, "labels": tokens}
