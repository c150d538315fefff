"""The draft vocabulary: the tokens MTP heads may predict, when they predict fewer than the model.

A head scored against the whole vocabulary pays two `V x H` projections per target in training and one
per draft in decoding; on small models that is most of a head's cost (SmolLM2-135M: V = 49,152,
H = 576). Text concentrates on few tokens: 320 of SmolLM2's own answers use 2,243 distinct tokens, and
8,192 tokens fitted on 80% of them cover 96% of the tokens of the other 20%
(`benchmarks/draft_vocab_coverage.py`). With
`MTPConfig.draft_vocab_size = N`, heads predict over N tokens only (EAGLE-3 and FR-Spec, Zhao et al.
2025, use such reduced draft vocabularies for the same reason): their loss is the cross-entropy over
those N tokens, a target outside them gives no loss and counts as a miss in the accuracy metrics, and a
draft is always one of them. Verification still uses the model's full distribution, so decoding stays
exact; a head simply never proposes a token outside its vocabulary.

Which N tokens: `DraftVocabulary.fit` takes token counts (most frequent first, ties by lower id) and
fills any slots left over with the lowest ids not yet chosen. The SFTTrainer hook fits an unfitted
vocabulary on the training set's tokens when the trainer is built (`fit_on_dataset`); a custom loop
calls `fit_draft_vocabulary` itself. The chosen ids are saved with the adapter (buffers of the head
stack) and restored exactly on load.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class DraftVocabulary(nn.Module):
    """The token ids a head stack predicts over, and the map from full-vocabulary ids to their slots.

    Args:
        size: number of draft tokens N.
        vocab_size: the model's vocabulary size V.

    Buffers (saved with the adapter):
        token_ids: `(N,)` sorted ids; slot i predicts token `token_ids[i]`.
        fitted: `()` bool, whether `fit` chose the ids (False: the placeholder `0..N-1`).
    """

    def __init__(self, size: int, vocab_size: int):
        super().__init__()
        if not 1 <= size <= vocab_size:
            raise ValueError(
                f"`draft_vocab_size` must be between 1 and the model's vocabulary size {vocab_size}, got {size}."
            )
        self.vocab_size = vocab_size
        self.register_buffer("token_ids", torch.arange(size, dtype=torch.long))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # (V,) slot of each id, -1 outside: derived from token_ids, rebuilt when they change (fit, load, move).
        self._slots: torch.Tensor | None = None
        self._slots_version = -1

    @property
    def size(self) -> int:
        """Number of draft tokens N."""
        return self.token_ids.numel()

    def slots(self) -> torch.Tensor:
        """`(V,)` long: the slot of every full-vocabulary id, -1 for ids outside the draft vocabulary."""
        ids = self.token_ids
        if self._slots is None or self._slots.device != ids.device or self._slots_version != ids._version:
            slots = torch.full((self.vocab_size,), -1, dtype=torch.long, device=ids.device)
            slots[ids] = torch.arange(ids.numel(), device=ids.device)
            self._slots, self._slots_version = slots, ids._version
        return self._slots

    def to_slots(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Map full-vocabulary ids (any shape; negative ids such as -100 stay -1) to slots, -1 outside."""
        return torch.where(token_ids >= 0, self.slots()[token_ids.clamp(min=0)], -1)

    def to_token_ids(self, slots: torch.Tensor) -> torch.Tensor:
        """Map slots (any shape) back to full-vocabulary ids."""
        return self.token_ids[slots]

    @torch.no_grad()
    def fit(self, counts: torch.Tensor) -> None:
        """Choose the N most frequent ids of `counts`, then the lowest unused ids for slots left over.

        The fill assumes what holds for BPE vocabularies, whose ids follow merge order: low ids are the
        common tokens. It matters only when the counts name fewer than N distinct tokens.

        Args:
            counts: `(V,)` occurrences of each token id in the training targets.
        """
        if counts.shape != (self.vocab_size,):
            raise ValueError(f"`counts` must have shape ({self.vocab_size},) (one count per token id), got "
                             f"{tuple(counts.shape)}.")
        counts = counts.to(device=self.token_ids.device, dtype=torch.float64)
        # Sort key: count descending, then id ascending (a stable sort of ids by -count does exactly that).
        order = torch.sort(-counts, stable=True).indices
        seen = order[: int((counts > 0).sum())][: self.size]
        if seen.numel() < self.size:
            unused = torch.ones(self.vocab_size, dtype=torch.bool, device=counts.device)
            unused[seen] = False
            seen = torch.cat([seen, unused.nonzero()[:, 0][: self.size - seen.numel()]])
        self.token_ids.copy_(seen.sort().values)
        self.fitted.fill_(True)


def count_tokens(sequences: Iterable[Iterable[int]], vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id in `sequences` (lists of ids), as a `(vocab_size,)` float64 tensor."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in sequences:
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        ids = ids[(ids >= 0) & (ids < vocab_size)]
        counts += torch.bincount(ids, minlength=vocab_size).to(torch.float64)
    return counts


def fit_draft_vocabulary(model, sequences: Iterable[Iterable[int]]) -> torch.Tensor:
    """Fit the active adapter's draft vocabulary on token sequences (e.g. the training targets).

    Args:
        model: a `PeftModel` with MTP heads (or its `MTPModel`) whose config sets `draft_vocab_size`.
        sequences: lists of token ids; ids < 0 (such as -100 labels) are skipped.

    Returns:
        The chosen `(N,)` token ids.

    Raises:
        ValueError: the active heads predict over the whole vocabulary (`draft_vocab_size=None`).
    """
    tuner = getattr(model, "base_model", model)
    vocabulary = tuner.active_heads().draft_vocab
    if vocabulary is None:
        raise ValueError("These MTP heads predict over the whole vocabulary (`draft_vocab_size=None`); there is no "
                         "draft vocabulary to fit. Set `MTPConfig(draft_vocab_size=...)` when creating the heads.")
    vocabulary.fit(count_tokens(sequences, vocabulary.vocab_size))
    return vocabulary.token_ids


def training_targets(dataset) -> Iterator[list[int]]:
    """The token ids heads are trained to predict in each row of a tokenized training set.

    A row's `input_ids`, restricted to its `completion_mask` / `assistant_masks` when it has one (TRL's prepared
    datasets mark completions and assistant turns that way).

    Args:
        dataset: rows with `input_ids` (e.g. an `SFTTrainer`'s `train_dataset`).

    Yields:
        One list of ids per row.
    """
    columns = getattr(dataset, "column_names", None) or []
    mask_column = next((name for name in ("completion_mask", "assistant_masks") if name in columns), None)
    for row in dataset:
        ids = row["input_ids"]
        mask = row[mask_column] if mask_column is not None else None
        if mask is not None and any(mask):
            ids = [token for token, keep in zip(ids, mask) if keep]
        yield ids


def fit_on_dataset(tuner, dataset) -> bool:
    """Fit an unfitted draft vocabulary on a tokenized training set (what the SFTTrainer hook calls).

    Args:
        tuner: the `MTPModel`.
        dataset: rows with `input_ids` (TRL's prepared training set), or None.

    Returns:
        Whether a vocabulary was fitted (False: none configured, already fitted, or no usable dataset).
    """
    heads = tuner.active_heads()
    vocabulary = None if heads is None else heads.draft_vocab
    if vocabulary is None or bool(vocabulary.fitted):
        return False
    if dataset is None or "input_ids" not in (getattr(dataset, "column_names", None) or []):
        warnings.warn(
            "The MTP heads' draft vocabulary is not fitted and the trainer's training set has no `input_ids` column "
            "to fit it on (a streaming or untokenized dataset?): heads would predict over the placeholder ids "
            f"0..{vocabulary.size - 1}. Call `peft_mtp.fit_draft_vocabulary(model, token_id_lists)` before training.",
            stacklevel=3,
        )
        return False
    vocabulary.fit(count_tokens(training_targets(dataset), vocabulary.vocab_size))
    return True
