"""Tiny random causal LMs built from configs in code, one per architecture the tests cover.

Every model has hidden size 32, 2 layers and a vocabulary of 128 tokens, so a forward pass takes
milliseconds on a CPU. Nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers

VOCAB_SIZE = 128
HIDDEN_SIZE = 32

_COMMON = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# (name, config class, kwargs). Sizes are the smallest each architecture accepts.
TINY_CONFIGS = {
    "llama": (
        transformers.LlamaConfig,
        dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, sliding_window=None),
    ),
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256),
    ),
    "gpt2": (
        transformers.GPT2Config,
        dict(n_embd=HIDDEN_SIZE, n_layer=2, n_head=4, n_positions=256),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, final_logit_softcapping=5.0,
             sliding_window=16),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, final_logit_softcapping=5.0,
             sliding_window=16),
    ),
    "phi3": (
        transformers.Phi3Config,
        dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256),
    ),
    "opt": (
        transformers.OPTConfig,
        dict(hidden_size=HIDDEN_SIZE, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, word_embed_proj_dim=HIDDEN_SIZE),
    ),
}

ARCHITECTURES = tuple(TINY_CONFIGS)


def make_config(arch: str) -> transformers.PretrainedConfig:
    """Build the tiny config of one architecture (see `TINY_CONFIGS`)."""
    config_cls, kwargs = TINY_CONFIGS[arch]
    return config_cls(**_COMMON, **kwargs)


def make_model(arch: str = "llama", seed: int = 0) -> transformers.PreTrainedModel:
    """Build a tiny random causal LM in eval mode, identically for the same `arch` and `seed`.

    Args:
        arch: one of `ARCHITECTURES`.
        seed: seed for the random weights.

    Returns:
        The model, in float32 and eval mode (no dropout), on the CPU.
    """
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(arch), attn_implementation="eager")
    return model.eval()
