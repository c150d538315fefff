"""The MTP loss: per-head cross-entropy, computed in chunks so that K x B x T x V logits never exist.

Head k (k = 1..K) at position t is scored against a target picked by `MTPConfig.head_target_source`:

* `"labels"`: the dataset token t+1+k (`alignment.head_targets`: -100 labels and document boundaries
  give no target).
* `"argmax"`: the model's own greedy prediction of token t+1+k, i.e. the argmax of its next-token
  distribution at position t+k (teacher-forced on the data). Self-distillation with hard targets.
* `"soft"`: the model's whole next-token distribution at t+k; the loss is KL(model || head k).
  Self-distillation with soft targets.

In the two self-distillation modes a target exists exactly where the `"labels"` mode has one, so
completion-only / assistant-only masks and document boundaries apply unchanged; the teacher is the
trunk of the same forward pass (with its LoRA, if any), detached.

How the chunks work (`FusedLinearCrossEntropy`): only rows with a target are scored. For a chunk of
rows it projects onto the whole vocabulary, takes the log-sum-exp, and computes the gradient with
respect to the hidden states right away (softmax minus one-hot, times the unembedding), then drops
the logits. The forward keeps only that `(N, H)` gradient; the backward scales it by the incoming
gradient. Two projections per row (the minimum for an exact full-vocabulary loss), one
`chunk x V` logits tile alive at a time, never `K x B x T x V`.

Why not TRL's `trl.kernels.ChunkedLogProbFunction` (what `add_fused_lm_head` uses), nor the earlier
checkpointed chunking: both recompute the logits in backward (three projections per row instead of
two), and TRL's CPU fallback runs many tile-sized element-wise passes. Measured on a 2-core CPU,
4,096 rows x 49,152 vocabulary x 576 hidden, forward + backward of one head: TRL's kernel 20-50 s,
this function 3.7-3.9 s (two matmuls: 3.0 s). On CUDA TRL's Triton kernel is fast, but it has no
soft-target variant here and would not share code with the CPU path, so one implementation serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .alignment import IGNORE_INDEX, head_targets
from .copying import copy_gate_loss

DEFAULT_CHUNK_ROWS = 1024
# Upper bound on the elements of one float32 logits tile (rows x vocab): 2**26 floats = 256 MiB. Large
# vocabularies get fewer rows per chunk.
MAX_TILE_ELEMENTS = 2**26
TARGET_SOURCES = ("labels", "argmax", "soft")


@dataclass
class Unembedding:
    """What turns a hidden state into logits: `transform(norm(hidden) @ weight.T + bias)`.

    Attributes:
        norm: the model's final norm (applied with autograd, outside the fused kernel).
        weight: `(V, H)` unembedding matrix.
        bias: optional `(V,)` bias.
        logit_scale: multiplier applied to the logits before soft-capping (Cohere, Granite).
        softcap: `cap` of `cap * tanh(logits / cap)` (Gemma 2 / 3), or None.
    """

    norm: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits of pre-norm hidden states (for references and tests: `(..., V)` at once)."""
        logits = torch.nn.functional.linear(self.norm(hidden), self.weight, self.bias)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class MTPLossOutput:
    """Result of `mtp_loss`.

    Attributes:
        loss: weighted sum of the head losses (`sum_k w_k * loss_k`), a scalar with grad.
        head_losses: `(K,)` mean loss of each head over its valid targets (0 where it has none).
        head_loss_sums: `(K,)` summed loss of each head (what sums exactly across processes).
        head_correct: `(K,)` number of valid targets each head ranked first (top-1 hits; in `"soft"` mode,
            rows where the head's argmax is the model's argmax).
        head_counts: `(K,)` number of valid targets of each head (the denominator of its accuracy).
        head_scored: `(K,)` number of those the loss scored (the denominator of its loss): fewer than
            `head_counts` only with a draft vocabulary, which cannot score targets outside it.
        copy_loss: `(K,)` mean binary cross-entropy of each head's copy gate over the targets that had a copy
            candidate (`peft_mtp.copying`; None when heads do not copy). Already inside `loss`.
        copy_scored: `(K,)` targets with a copy candidate.
        copy_right: `(K,)` of those, how many had the right candidate.
    """

    loss: torch.Tensor
    head_losses: torch.Tensor
    head_loss_sums: torch.Tensor
    head_correct: torch.Tensor
    head_counts: torch.Tensor
    head_scored: torch.Tensor
    copy_loss: torch.Tensor | None = None
    copy_scored: torch.Tensor | None = None
    copy_right: torch.Tensor | None = None

    @property
    def head_accuracies(self) -> torch.Tensor:
        """`(K,)` top-1 accuracy of each head (0 where it has no valid target)."""
        return self.head_correct / self.head_counts.clamp(min=1)


def _rows_per_chunk(vocab_size: int, chunk_rows: int) -> int:
    return max(1, min(chunk_rows, MAX_TILE_ELEMENTS // max(vocab_size, 1)))


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (bf16 / fp16 training), else the tensor's own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_scale: float,
             softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of one chunk, and d(logits)/d(raw projection) when it is not the constant `logit_scale`.

    Returns:
        `(logits (n, V), tanh)`: `tanh` is the soft-capping's `tanh(.)` tile (its derivative needs it), else None.
    """
    logits = (hidden @ weight.t()).float()  # (n, V): one rounding to float32, then float32 math
    if bias is not None:
        logits += bias.float()
    if logit_scale != 1.0:
        logits *= logit_scale
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy (or KL to a teacher) of rows of hidden states against the full vocabulary.

    The gradients are computed in the forward, one chunk of rows at a time, and only they are kept
    (see the module docstring). Inputs and outputs:

    * `hidden (N, H)`: normalised hidden states (after the final norm), one row per target.
    * `weight (V, H)`, `bias (V,)` or None: the unembedding; gradients for them are computed only when
      they require grad (a head's own unembedding).
    * `targets (N,)`: target token ids, or None with `teacher`.
    * `teacher (N, H)` or None: normalised hidden states whose next-token distribution is the target
      (loss = KL(teacher || student), no gradient to the teacher).
    * `logit_scale`, `softcap`: the model's logit transform (see `Unembedding`).
    * `chunk_rows`: rows projected at once.

    Returns `(loss_sum, hits)`: a float32 scalar with grad, and the number of rows whose argmax is the
    target (the teacher's argmax in KL mode), without grad.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, logit_scale, softcap, chunk_rows):
        device, num_rows = hidden.device, hidden.shape[0]
        dtype = _compute_dtype(hidden)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        need_any = need_hidden or need_weight or need_bias
        grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, device=device, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros(bias.shape, device=device, dtype=torch.float32) if need_bias else None
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        hits = torch.zeros((), device=device, dtype=torch.long)
        rows = _rows_per_chunk(weight.shape[0], chunk_rows)
        # Explicit dtypes below; autocast would otherwise re-cast the float32 tiles of the gradient matmuls.
        with torch.autocast(device.type, enabled=False):
            weight_c = weight.to(dtype)
            for start in range(0, num_rows, rows):
                end = min(start + rows, num_rows)
                h = hidden[start:end].to(dtype)
                logits, tanh = _project(h, weight_c, bias, logit_scale, softcap)  # (n, V) float32
                top, argmax = logits.max(dim=-1)
                if teacher is None:
                    y = targets[start:end]
                    hits += (argmax == y).sum()
                    target_logit = logits.gather(1, y[:, None]).squeeze(1)
                    probs = logits.sub_(top[:, None]).exp_()  # in place: the logits tile becomes exp(z - max)
                    sum_exp = probs.sum(dim=-1)
                    loss_sum += (top + sum_exp.log() - target_logit).sum()
                    if need_any:
                        grad_logits = probs.div_(sum_exp[:, None])  # softmax
                        grad_logits[torch.arange(end - start, device=device), y] -= 1.0  # d CE / d logits
                else:
                    t_logits, _ = _project(teacher[start:end].to(dtype), weight_c, bias, logit_scale, softcap)
                    t_top, t_argmax = t_logits.max(dim=-1)
                    hits += (argmax == t_argmax).sum()
                    log_p = logits.sub_(top[:, None]).sub_(logits.exp().sum(-1, keepdim=True).log())
                    log_q = t_logits.sub_(t_top[:, None]).sub_(t_logits.exp().sum(-1, keepdim=True).log())
                    q = log_q.exp()
                    loss_sum += (q * (log_q - log_p)).sum()  # KL(q || p), summed over rows
                    grad_logits = log_p.exp_().sub_(q) if need_any else None  # d KL / d student logits = p - q
                    del t_logits, log_q, q
                if need_any:
                    if tanh is not None:  # logits = cap * tanh(scale * raw / cap): d/d raw = scale * (1 - tanh^2)
                        grad_logits.mul_(1.0 - tanh.square_())
                    if logit_scale != 1.0:
                        grad_logits.mul_(logit_scale)
                    grad_c = grad_logits.to(dtype)
                    if need_hidden:
                        grad_hidden[start:end] = (grad_c @ weight_c).float()
                    if need_weight:
                        grad_weight += (grad_c.t() @ h).float()
                    if need_bias:
                        grad_bias += grad_logits.sum(dim=0)
                del logits, tanh
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(hits)
        return loss_sum, hits

    @staticmethod
    def backward(ctx, grad_loss, grad_hits):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        # Chain rule with a scalar loss: d f(loss) / d x = f'(loss) * d loss / d x, where the forward computed the last factor.
        scale = grad_loss.float()
        return (
            None if grad_hidden is None else (grad_hidden * scale).to(hidden_dtype),
            None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None, None, None, None, None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    unembedding: Unembedding,
    targets: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of pre-norm hidden states against targets (or KL to a teacher), in chunks.

    Args:
        hidden: `(N, H)` pre-norm hidden states, one row per target.
        unembedding: the norm, unembedding and logit transform.
        targets: `(N,)` target ids (exclusive with `teacher`).
        teacher: `(N, H)` pre-norm hidden states of the teacher rows (no gradient flows to them).
        chunk_rows: rows projected at once (bounded so a tile holds at most `MAX_TILE_ELEMENTS` floats).

    Returns:
        `(loss_sum, hits)`: a float32 scalar with grad and a long scalar.
    """
    if (targets is None) == (teacher is None):
        raise ValueError("Pass exactly one of `targets` and `teacher`.")
    if hidden.shape[0] == 0:
        return hidden.sum(dtype=torch.float32) * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    normed = unembedding.norm(hidden)
    normed_teacher = None
    if teacher is not None:
        with torch.no_grad():
            normed_teacher = unembedding.norm(teacher)
    return FusedLinearCrossEntropy.apply(
        normed, unembedding.weight, unembedding.bias, targets, normed_teacher, float(unembedding.logit_scale),
        unembedding.softcap, chunk_rows,
    )


@torch.no_grad()
def greedy_tokens(hidden: torch.Tensor, unembedding: Unembedding, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Argmax of the logits of pre-norm hidden states, a chunk of rows at a time.

    Args:
        hidden: `(N, H)` pre-norm hidden states.
        unembedding: the norm, unembedding and logit transform.
        chunk_rows: rows projected at once.

    Returns:
        `(N,)` token ids.
    """
    tokens = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    rows = _rows_per_chunk(unembedding.weight.shape[0], chunk_rows)
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        weight = unembedding.weight.to(dtype)
        for start in range(0, hidden.shape[0], rows):
            normed = unembedding.norm(hidden[start:start + rows]).to(dtype)
            logits, _ = _project(normed, weight, unembedding.bias, unembedding.logit_scale, unembedding.softcap)
            tokens[start:start + rows] = logits.argmax(dim=-1)
    return tokens


def model_predictions(labels: torch.Tensor, trunk_hidden: torch.Tensor, unembedding: Unembedding,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Replace every trainable label by the model's own greedy prediction of that token.

    `labels[:, s]` (when not -100) becomes the argmax of the model's next-token distribution at s-1.
    Passed to `alignment.head_targets` like labels, head k at t then gets the model's prediction at t+k.

    Args:
        labels: `(B, T)` unshifted labels, -100 where no loss is wanted.
        trunk_hidden: `(B, T, H)` the trunk's pre-norm hidden states.
        unembedding: the model's own unembedding (head 0).
        chunk_rows: rows projected at once.

    Returns:
        `(B, T)` long tensor: model predictions where `labels` is not -100, else -100.
    """
    predicted = torch.full_like(labels, IGNORE_INDEX)
    trainable = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): positions s >= 1 with a label
    if trainable.any():
        # The prediction of token s comes from position s-1.
        tokens = greedy_tokens(trunk_hidden[:, :-1][trainable], unembedding, chunk_rows)
        predicted[:, 1:][trainable] = tokens
    return predicted


def mtp_loss(
    head_hidden: torch.Tensor,
    labels: torch.Tensor,
    unembedding_of: Callable[[int], Unembedding],
    weights: Sequence[float],
    position_ids: torch.Tensor | None = None,
    target_source: str = "labels",
    trunk_hidden: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    sample_rate: float = 1.0,
    target_slots: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_weight: float = 0.0,
    copy_candidates: torch.Tensor | None = None,
    copy_gate_logits: torch.Tensor | None = None,
) -> MTPLossOutput:
    """Weighted loss of K heads against tokens t+1+k, without materialising their logits.

    Args:
        head_hidden: `(B, T, K, H)` head outputs (before the final norm).
        labels: `(B, T)` unshifted labels, -100 where no loss is wanted.
        unembedding_of: `k -> Unembedding` for head k = 1..K, and k = 0 for the model's own head (the
            teacher of the self-distillation modes).
        weights: K weights w_k (normalised by the config).
        position_ids: `(B, T)` position ids of packed sequences, so no target crosses a document.
        target_source: `"labels"`, `"argmax"` or `"soft"` (see the module docstring).
        trunk_hidden: `(B, T, H)` the trunk's pre-norm hidden states; required by `"argmax"` and `"soft"`.
        chunk_rows: rows projected at once.
        sample_rate: fraction of each head's valid targets to score, drawn at random per head (1.0: all). The mean
            over the drawn targets is an unbiased estimate of the mean over all of them.
        target_slots: for heads with a draft vocabulary (`unembedding_of(k)` then scores its N tokens only): maps
            token ids to their slots, -1 outside it. Targets outside give no loss and count as misses.
        feature_weight: weight of the feature-regression term: head k's output at t against the trunk's hidden state
            at t+k (smooth L1, mean over the hidden size and the head's valid targets); needs `trunk_hidden`.
        copy_candidates: `(B, T, K)` heads' copy candidates (-1: none) when the heads copy (`peft_mtp.copying`).
        copy_gate_logits: `(B, T, K)` their gates' logits, computed on detached head outputs; each gate's binary
            cross-entropy against "the candidate is the target" (mean over targets with a candidate) is added
            with the head's weight.

    Returns:
        An `MTPLossOutput`. A head with no valid target contributes 0 (never NaN).
    """
    if target_source not in TARGET_SOURCES:
        raise ValueError(f"`target_source` must be one of {TARGET_SOURCES}, got {target_source!r}.")
    if (target_source != "labels" or feature_weight > 0) and trunk_hidden is None:
        raise ValueError(f"`target_source={target_source!r}` and `feature_weight={feature_weight}` need the trunk's "
                         "hidden states (`trunk_hidden`).")
    if target_source == "argmax":
        labels = model_predictions(labels, trunk_hidden, unembedding_of(0), chunk_rows)
    seq_len, num_heads = head_hidden.shape[1], head_hidden.shape[2]
    if (copy_candidates is None) != (copy_gate_logits is None):
        raise ValueError("Pass both `copy_candidates` and `copy_gate_logits`, or neither.")
    sums, hits, counts, scored_counts, copy_sums, copy_scored, copy_right = [], [], [], [], [], [], []
    total = head_hidden.new_zeros((), dtype=torch.float32)
    for k in range(1, num_heads + 1):
        targets = head_targets(labels, k, position_ids)  # (B, T)
        valid = targets != IGNORE_INDEX
        if sample_rate < 1.0:
            valid &= torch.rand(valid.shape, device=valid.device) < sample_rate
        count = valid.sum()
        hidden_k = head_hidden[:, :, k - 1][valid]  # (N, H)
        if target_source == "soft":
            # Head k at t learns the model's distribution at t+k (valid t all have t+k < T), over the head's own
            # vocabulary (the teacher is projected with the same unembedding rows, so it is renormalised there).
            teacher = trunk_hidden[:, k:][valid[:, : max(seq_len - k, 0)]].detach()
            loss_sum, hit = fused_linear_cross_entropy(hidden_k, unembedding_of(k), teacher=teacher,
                                                       chunk_rows=chunk_rows)
            scored = count
        else:
            y, scored_hidden = targets[valid], hidden_k
            if target_slots is not None:
                y = target_slots(y)
                inside = y >= 0
                scored_hidden, y = hidden_k[inside], y[inside]
            loss_sum, hit = fused_linear_cross_entropy(scored_hidden, unembedding_of(k), targets=y,
                                                       chunk_rows=chunk_rows)
            scored = count.new_tensor(y.shape[0])
        total = total + weights[k - 1] * (loss_sum / scored.clamp(min=1))
        if feature_weight > 0 and hidden_k.shape[0]:
            # The state head k should reach at t is the trunk's own at t+k (its logits predict token t+1+k).
            target = trunk_hidden[:, k:][valid[:, : seq_len - k]].detach()
            feature = torch.nn.functional.smooth_l1_loss(hidden_k.float(), target.float())
            total = total + weights[k - 1] * feature_weight * feature
        if copy_candidates is not None:
            gate_sum, gate_scored, right = copy_gate_loss(copy_gate_logits[..., k - 1], copy_candidates[..., k - 1],
                                                          targets, valid)
            total = total + weights[k - 1] * (gate_sum / gate_scored.clamp(min=1))
            copy_sums.append(gate_sum.detach())
            copy_scored.append(gate_scored)
            copy_right.append(right)
        sums.append(loss_sum.detach())
        hits.append(hit)
        counts.append(count)
        scored_counts.append(scored)
    if not total.requires_grad and head_hidden.requires_grad:
        # No valid target anywhere: keep the graph connected so backward() runs (with zero gradients).
        total = total + 0.0 * head_hidden.sum()
    head_loss_sums, head_scored = torch.stack(sums), torch.stack(scored_counts)
    copy = {}
    if copy_candidates is not None:
        scored_copies = torch.stack(copy_scored)
        copy = dict(copy_loss=torch.stack(copy_sums) / scored_copies.clamp(min=1), copy_scored=scored_copies,
                    copy_right=torch.stack(copy_right))
    return MTPLossOutput(
        loss=total,
        head_losses=head_loss_sums / head_scored.clamp(min=1),
        head_loss_sums=head_loss_sums,
        head_correct=torch.stack(hits),
        head_counts=torch.stack(counts),
        head_scored=head_scored,
        **copy,
    )
