# /// script
# dependencies = ["peft_mtp"]
# ///
"""Count the parameters of every MTP head type on SmolLM2-135M's shapes (the numbers in docs/head_types.md).

The base model is SmolLM2-135M's config (hidden 576, intermediate 1536, 9 attention heads, 3 KV heads, vocabulary
49,152, tied embeddings) with 2 decoder layers instead of 30: head sizes do not depend on the trunk's depth, and
random weights are enough to count. Nothing is downloaded.

    python docs/head_param_counts.py
"""

from __future__ import annotations

import torch
import transformers
from peft import get_peft_model

from peft_mtp import HEAD_TYPES, MTPConfig

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=2048)


def head_parameters(base: torch.nn.Module, head_type: str, **kwargs) -> int:
    """Parameters of ONE head of `head_type` (the adapter's trainable parameters over K=2 heads, halved)."""
    model = get_peft_model(base, MTPConfig(num_heads=2, head_type=head_type, **kwargs))
    count = sum(p.numel() for p in model.base_model.mtp.mtp_heads["default"].parameters())
    model.unload()  # detach the heads again so the next count starts from the bare model
    return count // 2


def main() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, **SMOLLM2_135M)
    base = transformers.LlamaForCausalLM(config).eval()
    base_total = 134_515_008  # SmolLM2-135M with its 30 layers (the 2-layer stand-in is smaller)
    hidden, vocab = config.hidden_size, config.vocab_size
    print(f"hidden {hidden}, vocab {vocab}: an unembedding copy (share_unembedding=False) is {hidden * vocab:,} "
          "parameters per head\n")
    print("| head_type | parameters per head (num_layers=1) | K=4 heads | % of the 135M model | per extra layer |")
    print("|---|---:|---:|---:|---:|")
    for head_type in HEAD_TYPES:
        one = head_parameters(base, head_type)
        two = head_parameters(base, head_type, num_layers=2)
        print(f"| `{head_type}` | {one:,} | {4 * one:,} | {100 * 4 * one / base_total:.1f}% | {two - one:,} |")


if __name__ == "__main__":
    main()
