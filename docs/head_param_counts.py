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

import copy

import torch
import transformers
from peft import get_peft_model

from peft_mtp import HEAD_TYPES, MTPConfig

DRAFT_VOCAB_SIZE = 8192  # the main job's `MTPConfig.draft_vocab_size`
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=2048)


def head_parameters(base: torch.nn.Module, head_type: str, **kwargs) -> int:
    """Parameters of ONE head of `head_type` (the adapter's trainable parameters over K=2 heads, halved)."""
    model = get_peft_model(copy.deepcopy(base), MTPConfig(num_heads=2, head_type=head_type, **kwargs))
    return sum(p.numel() for p in model.base_model.mtp.mtp_heads["default"].parameters()) // 2


def main() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, **SMOLLM2_135M)
    base = transformers.LlamaForCausalLM(config).eval()
    # SmolLM2-135M itself: the stand-in plus the 28 decoder layers it leaves out.
    layer = sum(p.numel() for p in base.model.layers[0].parameters())
    base_total = sum(p.numel() for p in base.parameters()) + 28 * layer
    hidden, vocab = config.hidden_size, config.vocab_size
    print(f"SmolLM2-135M: {base_total:,} parameters; hidden {hidden}, vocab {vocab}: an unembedding copy "
          f"(share_unembedding=False) is {hidden * vocab:,} parameters per head\n")
    # Per position, a head multiplies by each of its weights once (attention and convolution add a term that grows
    # with the context), then by the unembedding: about `parameters + hidden * vocab` multiply-adds. The model's
    # own forward is about its parameter count per token (the tied unembedding is used once, the lookup is free).
    print("| head_type | parameters per head (num_layers=1) | K=4 heads | % of the model | per extra layer "
          "| multiply-adds per position, one head with the unembedding | % of a model forward "
          f"| the same with `draft_vocab_size={DRAFT_VOCAB_SIZE}` | % of a model forward |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for head_type in HEAD_TYPES:
        one = head_parameters(base, head_type)
        two = head_parameters(base, head_type, num_layers=2)
        per_position = one + hidden * vocab
        draft = one + hidden * DRAFT_VOCAB_SIZE
        print(f"| `{head_type}` | {one:,} | {4 * one:,} | {100 * 4 * one / base_total:.1f}% | {two - one:,} "
              f"| {per_position / 1e6:.1f}M | {100 * per_position / base_total:.0f}% "
              f"| {draft / 1e6:.1f}M | {100 * draft / base_total:.0f}% |")

if __name__ == "__main__":
    main()
