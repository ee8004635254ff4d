"""A small Llama-shaped causal LM (transformers' LlamaForCausalLM from a LlamaConfig), for the tests
that trace what examples/llama_8b.py is at full size: grouped-query attention, RoPE, SwiGLU, RMSNorm,
labels given so the model returns .loss. Needs transformers (the tests skip without it)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENS = 32
CONFIG = LlamaConfig(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False,
)


def build_model() -> torch.nn.Module:
    return LlamaForCausalLM(CONFIG)


def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, CONFIG.vocab_size, (batch_size, TOKENS))
    return {"input_ids": tokens, "labels": tokens}
