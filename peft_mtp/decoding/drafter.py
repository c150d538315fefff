"""Running the MTP heads while decoding: their caches, and the drafts they propose.

The decoder tells the drafter which trunk positions became verified (`observe`) and asks it for
head logits at the last verified position (`head_logits`, parallel heads) or for a chain of drafts
(`draft_chain`, sequential heads). Positions are numbered per row from 0 (the first real prompt
token), as transformers numbers them with left padding.

Parallel heads (`linear`, `ffn`, `mha_ffn`, `cnn`, `identical`) read trunk positions only, so they
process each verified trunk position exactly once, as it arrives; those with context append it to
their caches. Head k's output at the last verified trunk position T predicts token T+1+k.

`sequential` heads (DeepSeek-V3) are a chain: depth k at position t reads depth k-1's output at t
and the embedding of token t+k. At the last trunk position T = V-1 (V: the verified token the model
will be fed next) depth k reads tokens up to V-1+k, i.e. the drafts of depths 1..k-1. Depth k
therefore *commits* (caches for good) only positions t <= V-k, whose input tokens are all verified,
and recomputes the k-1 positions after them every step with the current drafts, exactly as the
training forward (teacher forcing on the true tokens) computes the committed ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..heads import HeadCache, HeadStep, MTPHeadStack
from ..trunk import Trunk, layer_signature
from .layout import (
    additive_mask,
    apply_keep,
    chunk_attention_mask,
    front_align,
    plan_keep,
    ragged_cat,
    select_rows,
    take_columns,
)

PARALLEL_POSITION_WISE = ("linear", "ffn")


class HeadDrafter:
    """The heads of one adapter at decode time, with their per-row state.

    Args:
        heads: the active `MTPHeadStack`.
        trunk: the base model's `Trunk`.
    """

    def __init__(self, heads: MTPHeadStack, trunk: Trunk):
        self.heads = heads
        self.trunk = trunk
        self.num_heads = heads.num_heads
        self.head_type = heads.head_type
        self.sequential = heads.head_type == "sequential"
        self.position_wise = heads.head_type in PARALLEL_POSITION_WISE
        self.caches = [HeadCache() for _ in range(self.num_heads)]
        # Parallel heads with context share one layout (they cache the same trunk positions).
        self.valid: torch.Tensor | None = None  # (B, S)
        self.last_hidden: torch.Tensor | None = None  # (B, K, H): head outputs at the last trunk position
        # Sequential heads: per depth k (index k-1), its layout and committed positions, and the
        # outputs of depth k-1 (index k-1; depth 0 = trunk) that depth k has not consumed yet.
        self.depth_valid: list[torch.Tensor | None] = [None] * self.num_heads
        self.committed: torch.Tensor | None = None  # (B, K) positions committed by each depth
        self.pending: list[torch.Tensor | None] = [None] * self.num_heads  # (B, L, H), front-aligned
        self.pending_len: list[torch.Tensor | None] = [None] * self.num_heads  # (B,)
        self._rotary = getattr(trunk.decoder, "rotary_emb", None)

    # ------------------------------------------------------------------------------------------
    # Trunk positions arrive

    def observe(self, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        """Take newly verified trunk positions: their trunk outputs (hidden states before the final norm).

        Args:
            hidden: `(B, W, H)` trunk outputs; the prompt (left-padded) on the first call, then the
                verified positions of a step (front-aligned: each row's real entries first).
            valid: `(B, W)` real entries.
        """
        if self.sequential:
            moved, lengths = front_align(hidden, valid)
            if self.pending[0] is None:
                batch = hidden.shape[0]
                self.committed = torch.zeros(batch, self.num_heads, dtype=torch.long, device=hidden.device)
                for index in range(1, self.num_heads):
                    self.pending[index] = hidden.new_zeros(batch, 0, hidden.shape[-1])
                    self.pending_len[index] = torch.zeros_like(lengths)
                self.pending[0], self.pending_len[0] = moved, lengths
            else:
                self.pending[0], self.pending_len[0] = ragged_cat(self.pending[0], self.pending_len[0], moved, lengths)
            return
        last = (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(dim=1)  # last real entry
        if self.position_wise:
            self.last_hidden = self._run_parallel(hidden[torch.arange(hidden.shape[0]), last][:, None], None)[:, 0]
            return
        if self.valid is None:
            self.valid = valid.new_zeros(valid.shape[0], 0)
        step = self._step(self.valid, valid, positions=self._positions(self.valid, valid))
        outputs = self._run_parallel(hidden, step)  # (B, W, K, H)
        keep = valid.sum(dim=1)
        moved_index, _ = front_align(torch.arange(valid.shape[1], device=valid.device).expand_as(valid), valid)
        plan = plan_keep(self.valid, valid.shape[1], keep, moved_index)
        for cache in self.caches:
            cache.map_(lambda tensor, dim: apply_keep(tensor, dim, plan))
        self.valid = plan.valid
        self.last_hidden = outputs[torch.arange(hidden.shape[0]), last]

    def _run_parallel(self, hidden: torch.Tensor, step: HeadStep | None) -> torch.Tensor:
        if step is None:
            return self.heads(hidden, _NO_CONTEXT)  # (B, W, K, H)
        outputs = []
        for head, cache in zip(self.heads.heads, self.caches):
            outputs.append(head.forward_cached(hidden, cache, step))
        return torch.stack(outputs, dim=2)

    # ------------------------------------------------------------------------------------------
    # Drafts

    def head_logits(self, depth: int) -> torch.Tensor:
        """Logits of parallel heads 1..depth at the last verified trunk position, in one unembedding matmul.

        Returns:
            `(B, depth, N)` over the heads' vocabulary (`MTPHeadStack.token_ids` maps slots to token ids);
            `[:, k-1]` predicts the token k positions after the one the model predicts.
        """
        return self.heads.draft_logits(self.last_hidden[:, :depth], self.trunk)

    def draft_chain(
        self,
        depth: int,
        verified: Callable[[torch.Tensor], torch.Tensor],
        num_verified: torch.Tensor,
        pick: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Run sequential depths 1..depth as a chain and return their drafts.

        Args:
            depth: how many depths to draft with (the others only commit what they can).
            verified: maps `(B, W)` positions to verified token ids (positions < `num_verified`).
            num_verified: `(B,)` verified tokens per row; the last one (position V) is the one the
                model is fed next, and trunk outputs exist for positions < V.
            pick: `(k, logits (B, N), hidden (B, H)) -> (B,)` chooses depth k's draft (a token id) from its logits
                over the heads' vocabulary (and its output, for heads that copy).

        Returns:
            `(B, depth)` drafts; `[:, k-1]` is the token at position V+k.
        """
        batch, device = num_verified.shape[0], num_verified.device
        last = num_verified - 1  # V: position of the token fed next
        drafts = torch.zeros(batch, 0, dtype=torch.long, device=device)
        previous, previous_len = None, None  # depth k-1's outputs this step, from its first uncommitted position
        for k in range(1, self.num_heads + 1):
            index = k - 1
            old_committed = self.committed[:, index]
            new_committed = (last + 1 - k).clamp(min=0)
            if previous is None:
                inputs, inputs_len = self.pending[index], self.pending_len[index]
            else:
                inputs, inputs_len = ragged_cat(self.pending[index], self.pending_len[index], previous, previous_len)
            if k > depth:
                # Not drafting with this depth: keep what it will need later, uncomputed.
                lower_committed = self.committed[:, index - 1] if index else last
                self._keep_pending(index, inputs, lower_committed - old_committed)
                previous = None
                continue
            width = inputs.shape[1]  # window: positions old_committed .. V-1 (inputs_len of them)
            window_valid = torch.arange(width, device=device)[None, :] < inputs_len[:, None]
            positions = old_committed[:, None] + torch.arange(width, device=device)[None, :]
            token_positions = positions + k
            # Tokens t+k: verified up to V, then the drafts of depths 1..k-1 (position V+i is draft i).
            from_drafts = token_positions > last[:, None]
            draft_index = (token_positions - last[:, None] - 1).clamp(0, max(drafts.shape[1] - 1, 0))
            tokens = verified(token_positions.clamp(max=last[:, None]).masked_fill(~window_valid, 0))
            if drafts.shape[1]:
                tokens = torch.where(from_drafts, drafts.gather(1, draft_index), tokens)
            valid = self.depth_valid[index]
            if valid is None:
                valid = window_valid.new_zeros(batch, 0)
            step = self._step(valid, window_valid, positions=positions)
            outputs = self.heads.heads[index].forward_cached(
                inputs, self.trunk.embed(tokens), self.caches[index], step
            )  # (B, W, H)
            commit = new_committed - old_committed
            plan = plan_keep(valid, width, commit)
            self.caches[index].map_(lambda tensor, dim, plan=plan: apply_keep(tensor, dim, plan))
            self.depth_valid[index] = plan.valid
            # Depth k-1's committed outputs that depth k has not committed stay pending for it.
            lower_committed = self.committed[:, index - 1] if index else last
            self._keep_pending(index, inputs, lower_committed - old_committed, start=commit)
            self.committed[:, index] = new_committed
            # Draft k: the output at position V-1, window entry inputs_len - 1.
            last_output = outputs[torch.arange(batch, device=device), inputs_len - 1]
            logits = self.heads.draft_logits(last_output, self.trunk, k=k)  # (B, N)
            drafts = torch.cat([drafts, pick(k, logits, last_output)[:, None]], dim=1)
            previous, previous_len = outputs, inputs_len
        return drafts

    def _keep_pending(self, index: int, inputs: torch.Tensor, upto: torch.Tensor,
                      start: torch.Tensor | None = None) -> None:
        """Keep entries `start..upto-1` of `inputs` (front-aligned) as depth index+1's pending inputs."""
        start = torch.zeros_like(upto) if start is None else start
        count = (upto - start).clamp(min=0)
        width = max(int(count.max()), 0)
        self.pending[index] = take_columns(inputs, start, max(width, 1))[:, :width]
        self.pending_len[index] = count

    # ------------------------------------------------------------------------------------------
    # Rows

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (rows that finished are dropped)."""
        for cache in self.caches:
            cache.map_(lambda tensor, dim: select_rows(tensor, rows))
        if self.valid is not None:
            self.valid = select_rows(self.valid, rows)
        if self.last_hidden is not None:
            self.last_hidden = select_rows(self.last_hidden, rows)
        if self.committed is not None:
            self.committed = select_rows(self.committed, rows)
        for index in range(self.num_heads):
            if self.depth_valid[index] is not None:
                self.depth_valid[index] = select_rows(self.depth_valid[index], rows)
            if self.pending[index] is not None:
                self.pending[index] = select_rows(self.pending[index], rows)
                self.pending_len[index] = select_rows(self.pending_len[index], rows)

    # ------------------------------------------------------------------------------------------
    # Masks and layer arguments

    @staticmethod
    def _positions(past_valid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Position of each new entry: real cached entries before it, plus real new entries before it."""
        return past_valid.sum(dim=1, keepdim=True) + (valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def _step(self, past_valid: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> HeadStep:
        mask = chunk_attention_mask(past_valid, valid)
        step = HeadStep(valid=valid, past_valid=past_valid, attention_mask=mask)
        if self.head_type in ("identical", "sequential"):
            step.layer_kwargs = self._layer_kwargs(mask, positions)
        return step

    def _layer_kwargs(self, mask: torch.Tensor, positions: torch.Tensor) -> dict:
        """Arguments for decoder layers of the base model's class over new positions."""
        dtype = self.trunk.unembedding.weight.dtype
        layer = self.heads.heads[0].layers[0]
        parameters = layer_signature(layer).parameters
        kwargs = {"attention_mask": additive_mask(mask, dtype), "position_ids": positions}
        if "position_embeddings" in parameters:
            if self._rotary is None:
                raise NotImplementedError(
                    f"Decoder-layer heads of {type(self.trunk.model).__name__} take rotary embeddings, but its decoder "
                    "has no `rotary_emb` module to compute them at decode time; use `ffn` or `mha_ffn` heads."
                )
            probe = torch.empty(1, dtype=dtype, device=positions.device)
            try:
                kwargs["position_embeddings"] = self._rotary(probe, positions)
            except TypeError:
                # Models with one rotary embedding per layer type (Gemma 3) take the layer's type as well.
                layer_type = getattr(layer, "attention_type", None) or getattr(layer.self_attn, "layer_type", None)
                kwargs["position_embeddings"] = self._rotary(probe, positions, layer_type)
        return {key: value for key, value in kwargs.items() if key in parameters or _has_var_kwargs(parameters)}


def _has_var_kwargs(parameters) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class _NoContext:
    """Position-wise heads read no context; `MTPHeadStack.forward` still takes one."""

    input_ids = None
    attention_mask = None
    layer_kwargs: list = []
    embed = None


_NO_CONTEXT = _NoContext()
