"""A Llama-3-8B-shaped causal language model at 4096 tokens per sample: transformers'
LlamaForCausalLM built from a LlamaConfig (hidden 4096, intermediate 14336, 32 layers, 32 heads,
8 key-value heads, vocabulary 128256), randomly initialised: the memory of the real weights, none
of their download. Needs the `hf` extra (pip install -e ".[hf]").

Its model states alone (fp32 weights and gradients, AdamW's two moments: 16 bytes per parameter,
128 GB) fit no single GPU; plan it traced, on any machine:

    bsplan estimate examples/llama_8b.py --gpu H100-80GB --precision bf16 --strategy fsdp --gpus 8
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENS = 4096
CONFIG = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)


def build_model() -> torch.nn.Module:
    return LlamaForCausalLM(CONFIG)


def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, CONFIG.vocab_size, (batch_size, TOKENS))
    return {"input_ids": tokens, "labels": tokens}
