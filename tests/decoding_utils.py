"""Helpers of the decoding tests: tiny models with heads, padded batches, and drafts forced to a given quality."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import transformers
from peft import get_peft_model
from tiny_models import VOCAB_SIZE, make_config

from peft_mtp import MTPConfig
from peft_mtp.decoding.loop import SpeculativeDecoder

PAD = 0
EOS = 2


def diverse_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "eager") -> transformers.PreTrainedModel:
    """A tiny random causal LM whose greedy output varies (its unembedding is not tied to its embedding).

    With tied weights, a tiny random model's hidden state stays close to its input embedding, so it
    repeats its last token forever and every draft is trivially right.
    """
    torch.manual_seed(seed)
    config = make_config(arch)
    config.tie_word_embeddings = False
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def heads_model(head_type: str = "ffn", num_heads: int = 3, arch: str = "llama", seed: int = 0,
                dtype: torch.dtype = torch.float32, noise: float = 0.02, attn_implementation: str = "eager",
                **config):
    """A tiny model with MTP heads whose drafts are partly right (base init plus a little noise).

    Args:
        head_type: the heads' type.
        num_heads: K.
        arch: a tiny architecture (`tiny_models.ARCHITECTURES`).
        seed: seeds the model and the heads' noise.
        dtype: float64 removes near-ties between logits, so that token identity tests the algorithm and
            not float rounding (transformers' own batched decoding turns padding into NaN in float64, so
            padded batches use float32).
        noise: std of the noise added to every head weight (0 keeps the base init).
        attn_implementation: the base model's attention (`"sdpa"` is what a pretrained model loads with).
        **config: more `MTPConfig` fields.
    """
    base = diverse_model(arch, seed, attn_implementation)
    model = get_peft_model(base, MTPConfig(num_heads=num_heads, head_type=head_type, **config))
    model = model.to(dtype).eval()
    with torch.no_grad():
        for parameter in model.base_model.mtp.parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return model


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over the tiny models' vocabulary (ids 0-2: pad, bos, eos; then one character
    each), for what needs a real tokenizer, such as stop strings."""
    import string

    from tokenizers import Tokenizer, decoders, models

    specials = ["<pad>", "<s>", "</s>"]
    characters = string.ascii_letters + string.digits + string.punctuation
    characters += "".join(chr(code) for code in range(224, 224 + VOCAB_SIZE - len(specials) - len(characters)))
    vocab = {token: index for index, token in enumerate(specials + list(characters))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tokenizer.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<pad>")


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-padded prompts of the given lengths: `(input_ids, attention_mask)`."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, VOCAB_SIZE, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


@contextlib.contextmanager
def forced_drafts(continuations: torch.Tensor, quality: dict[int, bool] | None = None,
                  rank: int = 0) -> Iterator[None]:
    """Replace the heads' drafts by the known continuation of each row (100% acceptance), or by wrong tokens.

    The drafter still runs (its caches stay exercised); only the tokens it proposes change.

    Args:
        continuations: `(B, L)` what plain greedy decoding produces for each row (padded prompt included).
        quality: per original row, True for perfect drafts, False for drafts that are always wrong
            (default: all perfect).
        rank: place the right token at this candidate rank in tree drafts (chains use rank 0).
    """
    original = SpeculativeDecoder._draft

    def draft(self, tree, depth):
        tokens, probs = original(self, tree, depth)
        if depth == 0:
            return tokens, probs
        rows = self.rows
        lengths = self.lengths[rows]
        columns = (lengths[:, None] + torch.arange(depth)[None]).clamp(max=continuations.shape[1] - 1)
        right = continuations[rows[:, None], columns]  # (R, depth): the true next tokens
        wrong = (right + 1 + torch.arange(depth)[None]) % VOCAB_SIZE
        good = torch.tensor([True if quality is None else quality[int(r)] for r in rows])[:, None]
        chosen = torch.where(good, right, wrong)
        candidates = []
        for k in range(tree.depth):
            ranked = [(chosen[:, k] + 7 * (i + 1)) % VOCAB_SIZE for i in range(tree.topk[k])]
            if rank < tree.topk[k]:
                ranked[rank] = chosen[:, k]
            candidates.append(torch.stack(ranked, dim=1))
        return tree.node_tokens(self.root, candidates), probs

    SpeculativeDecoder._draft = draft
    try:
        yield
    finally:
        SpeculativeDecoder._draft = original
