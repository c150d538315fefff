"""The MTP head architectures, and the stack of K heads that one adapter holds.

Every head maps the trunk output (the hidden state that enters the model's final norm) to a hidden
state in the same space; the model's final norm and unembedding then turn it into logits (see
`Trunk.logits`). Head k at position t predicts token t+1+k (`peft_mtp.alignment`) and is causal:
parallel heads read positions <= t only; `sequential` heads also read tokens t+1..t+k, the chain
they draft.

Each head is built on its own (no module instance is shared between heads). With
`head_init="base"`, residual blocks start at zero and maps at the identity, so a fresh head
predicts exactly what the model's own next-token head predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_linear
from .alignment import future_tokens
from .config import MTPConfig
from .copying import CopyGate, copy_candidates, mix_copy, mixture_topk
from .draft_vocab import DraftVocabulary
from .trunk import Trunk, cache_argument_name, call_layer


@dataclass
class HeadContext:
    """What heads may read besides the trunk output, for one forward pass.

    Attributes:
        input_ids: `(B, T)` tokens of the pass (`sequential` heads embed tokens t+1..t+k from them).
        attention_mask: optional `(B, T)` padding mask (1 = real token).
        layer_kwargs: arguments the trunk gave its last decoder layers (see `Trunk.capture`).
        embed: the model's token embedding function.
    """

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None


class HeadCache:
    """What one head keeps between decoding steps: tensors that run over positions (keys, values, conv inputs).

    Each tensor is stored with the dimension that runs over positions. The decoder appends a chunk of
    new positions per step, then keeps, row by row, only the verified ones (`map_`), exactly as it
    rolls back the model's own KV cache. It also acts as the `cache` argument of transformers attention
    layers (they call `update(key_states, value_states, layer_idx)`), so decoder-layer heads reuse the
    base model's attention code unchanged.
    """

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.seq_dims: dict[str, int] = {}

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor stored under `name`, or None before the first `append`."""
        return self.tensors.get(name)

    def append(self, name: str, value: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Append new positions to the tensor `name` and return the whole tensor.

        Args:
            name: the tensor's key.
            value: the new positions.
            seq_dim: the dimension of `value` that runs over positions.

        Returns:
            The cached positions followed by the new ones.
        """
        old = self.tensors.get(name)
        full = value if old is None else torch.cat([old, value], dim=seq_dim)
        self.tensors[name] = full
        self.seq_dims[name] = seq_dim
        return full

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' `Cache.update` protocol: append keys and values `(B, heads, T, D)`, return all of them."""
        return (self.append(f"key.{layer_idx}", key_states, 2), self.append(f"value.{layer_idx}", value_states, 2))

    def map_(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Replace every tensor `t` by `fn(t, seq_dim)` (used to keep verified positions or rows)."""
        for name, tensor in self.tensors.items():
            self.tensors[name] = fn(tensor, self.seq_dims[name])


@dataclass
class HeadStep:
    """One cached head call: `w` new positions per row, appended after the positions the head has cached.

    Attributes:
        valid: `(B, w)` True for real new positions (rows may have fewer than `w`).
        past_valid: `(B, S)` True for real cached positions.
        attention_mask: `(B, 1, w, S + w)` bool: the cached and new positions each new position may read.
        layer_kwargs: keyword arguments for decoder layers of the base model's class (additive mask,
            position ids, rotary embeddings); the decoder adds the head's cache to them.
    """

    valid: torch.Tensor
    past_valid: torch.Tensor
    attention_mask: torch.Tensor
    layer_kwargs: dict[str, Any] = field(default_factory=dict)


def _zero_(*modules: nn.Module) -> None:
    for module in modules:
        nn.init.zeros_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def _normal_(std: float, *modules: nn.Module) -> None:
    for module in modules:
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class LinearHead(nn.Module):
    """`num_layers` hidden->hidden linear maps that start at the identity."""

    def __init__(self, hidden_size: int, num_layers: int, init: str, std: float):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        for linear in self.maps:
            if init == "base":
                nn.init.eye_(linear.weight)
                nn.init.zeros_(linear.bias)
            else:
                _normal_(std, linear)

    def forward(self, hidden: torch.Tensor, context: HeadContext) -> torch.Tensor:
        for linear in self.maps:
            hidden = linear(hidden)
        return hidden

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions (position-wise: nothing is cached)."""
        return self.forward(hidden, HeadContext())


class ResidualFFNBlock(nn.Module):
    """`x + SiLU(W norm(x) + b)`: Medusa's residual block, with a pre-norm for the un-normalised trunk output."""

    def __init__(self, hidden_size: int, init: str, std: float, dropout: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, hidden_size)
        # Zero weight AND bias: SiLU(0) = 0, so the block starts as the identity.
        _zero_(self.linear) if init == "base" else _normal_(std, self.linear)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + F.silu(self.linear(self.dropout(self.norm(hidden))))


class FFNHead(nn.Module):
    """`num_layers` residual SiLU blocks (Medusa style)."""

    def __init__(self, hidden_size: int, num_layers: int, init: str, std: float, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualFFNBlock(hidden_size, init, std, dropout) for _ in range(num_layers))

    def forward(self, hidden: torch.Tensor, context: HeadContext) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions (position-wise: nothing is cached)."""
        return self.forward(hidden, HeadContext())


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask (position t attends to positions <= t only)."""

    def __init__(self, hidden_size: int, num_heads: int, init: str, std: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        _normal_(std, self.qkv)
        # A zero output projection makes the attention branch start at zero.
        _zero_(self.out) if init == "base" else _normal_(std, self.out)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = hidden.shape
        q, k, v = self.qkv(hidden).view(B, T, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()  # (T, T): query t sees keys <= t
        if padding_mask is not None:
            # Padded keys are hidden too; a query always sees itself, so no row is empty.
            mask = mask & (padding_mask[:, None, None, :].bool() | torch.eye(T, dtype=torch.bool, device=hidden.device))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, H/heads)
        return self.out(attended.transpose(1, 2).reshape(B, T, H))

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, name: str, step: HeadStep) -> torch.Tensor:
        """Attend from new positions to the cached ones and to each other, as `step.attention_mask` allows."""
        B, W, H = hidden.shape
        q, k, v = self.qkv(hidden).view(B, W, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        k = cache.append(f"{name}.key", k, 2)  # (B, heads, S + W, H/heads)
        v = cache.append(f"{name}.value", v, 2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=step.attention_mask)
        return self.out(attended.transpose(1, 2).reshape(B, W, H))


class MHAFFNBlock(nn.Module):
    """`x + Attn(norm(x))`, then a residual SiLU FFN; both branches start at zero with `init="base"`."""

    def __init__(self, hidden_size: int, num_attention_heads: int, init: str, std: float, dropout: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.attn = CausalSelfAttention(hidden_size, num_attention_heads, init, std)
        self.ffn = ResidualFFNBlock(hidden_size, init, std, dropout)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.attn(self.dropout(self.attn_norm(hidden)), padding_mask)
        return self.ffn(hidden)

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, name: str, step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions, reading the cached keys and values."""
        hidden = hidden + self.attn.forward_cached(self.attn_norm(hidden), cache, name, step)
        return self.ffn(hidden)


class MHAFFNHead(nn.Module):
    """`num_layers` light transformer blocks: causal self-attention then a SiLU FFN."""

    def __init__(self, hidden_size: int, num_layers: int, num_attention_heads: int, init: str, std: float,
                 dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            MHAFFNBlock(hidden_size, num_attention_heads, init, std, dropout) for _ in range(num_layers)
        )

    def forward(self, hidden: torch.Tensor, context: HeadContext) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden, context.attention_mask)
        return hidden

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions; each block caches its keys and values."""
        for index, block in enumerate(self.blocks):
            hidden = block.forward_cached(hidden, cache, f"block{index}", step)
        return hidden


class CausalConvBlock(nn.Module):
    """`x + W SiLU(conv(norm(x)))` with a depthwise 1-D convolution padded on the left only.

    Left padding by `kernel_size - 1` makes output t read positions t-kernel_size+1..t: never the
    future (a symmetric padding would let position t read t+1, the token a head predicts).
    """

    def __init__(self, hidden_size: int, kernel_size: int, init: str, std: float, dropout: float):
        super().__init__()
        self.kernel_size = kernel_size
        self.norm = nn.RMSNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        _zero_(self.out) if init == "base" else _normal_(std, self.out)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(self.norm(hidden))
        if padding_mask is not None:
            x = x * padding_mask[..., None].to(x.dtype)  # padded positions contribute nothing
        x = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))  # (B, H, T + kernel - 1)
        x = self.conv(x).transpose(1, 2)  # (B, T, H)
        return hidden + self.out(F.silu(x))

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, name: str, step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions.

        The cache holds this block's normalised inputs at every cached position. New positions must
        follow the cached ones without gaps (real entries first in each row), so that the window of a
        new position is the `kernel_size` entries ending at it.
        """
        W = hidden.shape[1]
        x = self.norm(hidden) * step.valid[..., None].to(hidden.dtype)
        full = cache.append(name, x, 1)  # (B, S + W, H)
        full_valid = torch.cat([step.past_valid, step.valid], dim=1)
        span = W + self.kernel_size - 1
        window = (full * full_valid[..., None].to(full.dtype))[:, -span:]  # cached pads may hold stale values
        window = F.pad(window, (0, 0, span - window.shape[1], 0))  # (B, W + kernel - 1, H)
        # The depthwise convolution as one small contraction: for a few new positions it is much cheaper
        # than Conv1d's setup (and Conv1d has no fast float64 path on CPU).
        windows = window.unfold(1, self.kernel_size, 1)  # (B, W, H, kernel)
        x = torch.einsum("bwhk,hk->bwh", windows, self.conv.weight[:, 0, :])
        if self.conv.bias is not None:
            x = x + self.conv.bias
        return hidden + self.out(F.silu(x))


class CNNHead(nn.Module):
    """`num_layers` causal convolution blocks over the hidden sequence."""

    def __init__(self, hidden_size: int, num_layers: int, kernel_size: int, init: str, std: float, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            CausalConvBlock(hidden_size, kernel_size, init, std, dropout) for _ in range(num_layers)
        )

    def forward(self, hidden: torch.Tensor, context: HeadContext) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden, context.attention_mask)
        return hidden

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions; each block caches its normalised inputs."""
        for index, block in enumerate(self.blocks):
            hidden = block.forward_cached(hidden, cache, f"block{index}", step)
        return hidden


class DecoderLayersHead(nn.Module):
    """`num_layers` decoder layers of the base model's own class and config (Meta's `identical` heads).

    The layers run with the same masks and rotary embeddings the trunk gave its own last layers.
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, context: HeadContext) -> torch.Tensor:
        kwargs = context.layer_kwargs[-len(self.layers):]
        for layer, layer_kwargs in zip(self.layers, kwargs):
            hidden = call_layer(layer, hidden, layer_kwargs)
        return hidden

    def forward_cached(self, hidden: torch.Tensor, cache: HeadCache, step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions; the layers keep their keys and values in `cache`."""
        for layer in self.layers:
            hidden = call_layer(layer, hidden, {**step.layer_kwargs, **_cache_kwargs(layer, cache)})
        return hidden


class SequentialHead(nn.Module):
    """One depth of a DeepSeek-V3 style chain.

    Depth k combines the normalised hidden state of depth k-1 at position t with the normalised
    embedding of token t+k through a 2H -> H projection, then runs decoder layers of the base
    model's own class. It shares the model's embedding and unembedding.
    """

    def __init__(self, hidden_size: int, layers: list[nn.Module], init: str, std: float, eps: float):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.embed_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        if init == "base":
            # Start by passing the previous depth through: [I, 0].
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
        else:
            _normal_(std, self.proj)
        self.layers = nn.ModuleList(layers)

    def forward(self, previous: torch.Tensor, token_embeds: torch.Tensor, context: HeadContext) -> torch.Tensor:
        hidden = self.proj(torch.cat([self.hidden_norm(previous), self.embed_norm(token_embeds)], dim=-1))
        kwargs = context.layer_kwargs[-len(self.layers):]
        for layer, layer_kwargs in zip(self.layers, kwargs):
            hidden = call_layer(layer, hidden, layer_kwargs)
        return hidden

    def forward_cached(self, previous: torch.Tensor, token_embeds: torch.Tensor, cache: HeadCache,
                       step: HeadStep) -> torch.Tensor:
        """Decode-time forward over new positions of this depth; the layers keep keys and values in `cache`.

        Args:
            previous: `(B, W, H)` the previous depth's output (the trunk output for depth 1).
            token_embeds: `(B, W, H)` embeddings of token t+k at each new position t.
            cache: this depth's cache.
            step: masks and layer arguments of the new positions.
        """
        hidden = self.proj(torch.cat([self.hidden_norm(previous), self.embed_norm(token_embeds)], dim=-1))
        for layer in self.layers:
            hidden = call_layer(layer, hidden, {**step.layer_kwargs, **_cache_kwargs(layer, cache)})
        return hidden


class FeatureFusion(nn.Module):
    """The heads' input from several trunk layers: `hidden + W [norm(f_1); ...; norm(f_n)]` (EAGLE-3).

    EAGLE-3 (Li et al. 2025, arXiv:2503.01840) feeds its draft head low-, middle- and high-level features
    of the target model. Here the trunk output stays the backbone of the input and the other layers'
    outputs are added through a projection that starts at zero, so fresh heads see exactly the trunk
    output (and keep `head_init="base"` meaning what it says). Each layer output gets its own RMSNorm:
    the residual stream grows from layer to layer, so raw outputs differ in scale.

    Args:
        hidden_size: the trunk's hidden size H.
        num_features: how many layer outputs are fused (n).
        init: `"base"` (zero projection) or `"random"`.
        std: standard deviation of a random projection.
        eps: epsilon of the norms.
    """

    def __init__(self, hidden_size: int, num_features: int, init: str, std: float, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=eps) for _ in range(num_features))
        self.proj = nn.Linear(num_features * hidden_size, hidden_size, bias=False)
        _zero_(self.proj) if init == "base" else _normal_(std, self.proj)

    def forward(self, hidden: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """`(B, T, H)` trunk output and n `(B, T, H)` layer outputs -> `(B, T, H)` head input."""
        normed = [norm(feature.to(hidden.dtype)) for norm, feature in zip(self.norms, features)]
        return hidden + self.proj(torch.cat(normed, dim=-1))


class MTPHeadStack(nn.Module):
    """The K heads of one adapter, plus their own unembeddings when they do not share the model's.

    Args:
        config: the adapter's `MTPConfig`.
        trunk: the base model's `Trunk`.
    """

    def __init__(self, config: MTPConfig, trunk: Trunk):
        super().__init__()
        self.head_type = config.head_type
        self.num_heads = config.num_heads
        self.heads = nn.ModuleList(_build_head(config, trunk) for _ in range(config.num_heads))
        self.feature_layers = tuple(_check_feature_layers(config.feature_layers or (), trunk))
        self.fusion = None
        if self.feature_layers:
            self.fusion = FeatureFusion(trunk.hidden_size, len(self.feature_layers), config.head_init,
                                        float(getattr(trunk.config, "initializer_range", 0.02)), _norm_eps(trunk))
        self.unembeddings = None
        if not config.share_unembedding:
            self.unembeddings = nn.ModuleList(_copy_unembedding(trunk.unembedding) for _ in range(config.num_heads))
        self.copy_ngram = config.copy_ngram
        self.copy_gates = None
        if config.copy_ngram:
            self.copy_gates = nn.ModuleList(CopyGate(trunk.hidden_size) for _ in range(config.num_heads))
        self.draft_vocab = None
        if config.draft_vocab_size is not None:
            self.draft_vocab = DraftVocabulary(config.draft_vocab_size, trunk.vocab_size)
        # Gathered draft-vocabulary rows of frozen unembeddings (see `draft_unembedding`); a cache, not state.
        self._frozen_rows: dict[tuple, tuple] = {}

    @property
    def num_layer_kwargs(self) -> int:
        """How many of the trunk's last decoder layers the heads need the call arguments of."""
        if self.head_type in ("identical", "sequential"):
            return len(self.heads[0].layers)
        return 0

    @property
    def capture_kwargs(self) -> dict[str, Any]:
        """What `Trunk.capture` must record for these heads (layer arguments, layer outputs)."""
        return {"num_layer_kwargs": self.num_layer_kwargs, "feature_layers": self.feature_layers}

    def head_input(self, hidden: torch.Tensor, layer_outputs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """What the heads read at each position: the trunk output, fused with `feature_layers` outputs if any.

        Args:
            hidden: `(B, T, H)` trunk output (before the final norm).
            layer_outputs: `(B, T, H)` outputs of the trunk's `feature_layers`, in that order
                (`TrunkCapture.layer_outputs` of a capture with `capture_kwargs`).

        Returns:
            `(B, T, H)`: `hidden` itself without feature layers.

        Raises:
            ValueError: the number of layer outputs is not the number of feature layers.
        """
        if len(layer_outputs) != len(self.feature_layers):
            raise ValueError(
                f"These heads read trunk layers {list(self.feature_layers)} but got {len(layer_outputs)} layer "
                "outputs: capture them with `trunk.capture(**heads.capture_kwargs)`."
            )
        return hidden if self.fusion is None else self.fusion(hidden, layer_outputs)

    def forward(self, hidden: torch.Tensor, context: HeadContext) -> torch.Tensor:
        """Run all heads on their input.

        Args:
            hidden: `(B, T, H)` head input: the trunk output (before the final norm), or `head_input(...)` of
                it when the heads have `feature_layers`.
            context: what heads may read besides it.

        Returns:
            `(B, T, K, H)` head outputs; `[:, t, k-1]` is head k's hidden state at t (predicts t+1+k).
        """
        if self.head_type != "sequential":
            return torch.stack([head(hidden, context) for head in self.heads], dim=2)
        if context.input_ids is None or context.embed is None:
            raise ValueError("`sequential` heads need `input_ids` (they read tokens t+1..t+k); got inputs_embeds only.")
        outputs, previous = [], hidden
        for k, head in enumerate(self.heads, start=1):
            token_embeds = context.embed(future_tokens(context.input_ids, k))  # token t+k at position t
            previous = head(previous, token_embeds, context)
            outputs.append(previous)
        return torch.stack(outputs, dim=2)

    def logits(self, head_hidden: torch.Tensor, trunk: Trunk) -> torch.Tensor:
        """Full-vocabulary logits of head outputs (`-inf` outside the draft vocabulary, if the heads have one).

        Args:
            head_hidden: `(..., K, H)` head outputs.
            trunk: the base model's trunk (final norm, unembedding, logit transform).

        Returns:
            `(..., K, V)` logits.
        """
        return self.full_vocab_logits(self.draft_logits(head_hidden, trunk))

    def draft_logits(self, head_hidden: torch.Tensor, trunk: Trunk, k: int | None = None) -> torch.Tensor:
        """Logits over the heads' own vocabulary (the draft vocabulary, or the model's whole one).

        Shared unembeddings are applied in ONE matmul for all heads; slot i of the last dimension is token
        `token_ids(i)`.

        Args:
            head_hidden: `(..., K, H)` outputs of every head, or `(..., H)` of head `k` alone.
            trunk: the base model's trunk (final norm, unembedding, logit transform).
            k: the head (1..K) when `head_hidden` holds one head's outputs.

        Returns:
            `(..., K, N)` or `(..., N)` logits, N = the draft vocabulary size (V without one).
        """
        if k is not None:
            return self._project(head_hidden, trunk, self.unembedding_of(k))
        if self.unembeddings is None:
            return self._project(head_hidden, trunk, None)
        return torch.stack(
            [self._project(head_hidden[..., i, :], trunk, unembedding) for i, unembedding in enumerate(self.unembeddings)],
            dim=-2,
        )

    def _project(self, hidden: torch.Tensor, trunk: Trunk, unembedding: nn.Module | None) -> torch.Tensor:
        if self.draft_vocab is None:
            return trunk.logits(hidden, unembedding)
        linear = unembedding or trunk.unembedding
        weight, bias = self.draft_unembedding(linear.weight, getattr(linear, "bias", None))
        return trunk.transform_logits(fast_linear.linear(trunk.final_norm(hidden), weight, bias))

    def draft_unembedding(self, weight: torch.Tensor, bias: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of an unembedding (the model's, or a head's own) that score the draft vocabulary.

        Args:
            weight: `(V, H)` unembedding weight.
            bias: its `(V,)` bias, or None.

        Returns:
            `(N, H)` weight and `(N,)` bias or None (`weight` and `bias` themselves without a draft vocabulary).
        """
        if self.draft_vocab is None:
            return weight, bias
        ids = self.draft_vocab.token_ids
        if weight.requires_grad and torch.is_grad_enabled():
            return weight[ids], None if bias is None else bias[ids]  # a trainable copy: rows must carry grad
        # A frozen unembedding (the shared one, or any while decoding): gather its rows once, not at every call.
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, ids._version)
        cached = self._frozen_rows.get(key)
        if cached is None:
            if len(self._frozen_rows) >= 2 * (self.num_heads + 1):
                self._frozen_rows.clear()  # stale entries of weights that moved or changed
            cached = (weight.detach()[ids], None if bias is None else bias.detach()[ids])
            self._frozen_rows[key] = cached
        return cached

    def copy_candidates(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, T, K)` each head's copy candidate at each position (-1: none); see `peft_mtp.copying`."""
        return copy_candidates(input_ids, self.num_heads, self.copy_ngram, self.head_type == "sequential",
                               attention_mask)

    def copy_gate_logits(self, head_hidden: torch.Tensor, trunk: Trunk, candidates: torch.Tensor,
                         k: int | None = None) -> torch.Tensor:
        """Logits of each head's copy gate (g = P(candidate is the target)); `-inf` where there is no candidate.

        Args:
            head_hidden: `(..., K, H)` head outputs, or `(..., H)` of head `k` alone.
            trunk: the base model's trunk (final norm, unembedding, logit transform).
            candidates: `(..., K)` or `(...)` candidate token ids, -1 where none.
            k: the head (1..K) when `head_hidden` holds one head's outputs.

        Returns:
            `(..., K)` or `(...)` float32 gate logits.
        """
        if self.copy_gates is None:
            raise ValueError("These heads do not copy (`MTPConfig.copy_ngram=0`).")
        heads = [k] if k is not None else range(1, self.num_heads + 1)
        gates = []
        for index, head in enumerate(heads):
            hidden = head_hidden if k is not None else head_hidden[..., index, :]
            candidate = candidates if k is not None else candidates[..., index]
            linear = self.unembedding_of(head) or trunk.unembedding
            normed = trunk.final_norm(hidden)
            rows = linear.weight[candidate.clamp(min=0)]  # (..., H): the candidate's unembedding row
            logit = (normed.to(rows.dtype) * rows).sum(-1)
            if getattr(linear, "bias", None) is not None:
                logit = logit + linear.bias[candidate.clamp(min=0)]
            gate = self.copy_gates[head - 1](normed, trunk.transform_logits(logit))
            gates.append(gate.masked_fill(candidate < 0, float("-inf")))
        return gates[0] if k is not None else torch.stack(gates, dim=-1)

    def copy_topk(self, head_hidden: torch.Tensor, trunk: Trunk, candidates: torch.Tensor, k: int = 1,
                  head: int | None = None, slot_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids of each head's k best drafts with its copy candidate mixed in (`copying.mixture_topk`).

        Args:
            head_hidden: `(..., K, H)` head outputs, or `(..., H)` of head `head` alone.
            trunk: the base model's trunk.
            candidates: `(..., K)` or `(...)` candidate token ids, -1 where none.
            k: drafts per head.
            head: the head (1..K) when `head_hidden` holds one head's outputs.
            slot_logits: the heads' `draft_logits` of `head_hidden` when already computed.

        Returns:
            `(..., K, k)` or `(..., k)` token ids, best first.
        """
        if slot_logits is None:
            slot_logits = self.draft_logits(head_hidden, trunk, k=head)
        gates = self.copy_gate_logits(head_hidden, trunk, candidates, k=head)
        to_slots = None if self.draft_vocab is None else self.draft_vocab.to_slots
        return mixture_topk(slot_logits, candidates, gates, k, token_ids=self.token_ids if self.draft_vocab else None,
                            to_slots=to_slots)

    def copy_log_probs(self, head_hidden: torch.Tensor, trunk: Trunk, candidates: torch.Tensor,
                       logits: torch.Tensor | None = None) -> torch.Tensor:
        """`(..., K, V)` log-probabilities of each head's drafts with its copy candidate mixed in (`mix_copy`).

        `logits`: the heads' `logits(head_hidden, trunk)` when already computed (they are not computed again).
        """
        logits = self.logits(head_hidden, trunk) if logits is None else logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return mix_copy(log_probs, candidates, self.copy_gate_logits(head_hidden, trunk, candidates))

    def full_vocab_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Scatter `(..., N)` draft-vocabulary logits into `(..., V)`, `-inf` for tokens heads cannot draft."""
        if self.draft_vocab is None:
            return draft_logits
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.draft_vocab.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_vocab.token_ids, draft_logits)

    def token_ids(self, slots: torch.Tensor) -> torch.Tensor:
        """Token ids of draft-vocabulary slots (the argmax / top-k indices of `draft_logits`)."""
        return slots if self.draft_vocab is None else self.draft_vocab.to_token_ids(slots)

    def unembedding_of(self, k: int) -> nn.Module | None:
        """Head k's own unembedding (k = 1..K), or None when heads share the model's."""
        return None if self.unembeddings is None else self.unembeddings[k - 1]


def _cache_kwargs(layer: nn.Module, cache: HeadCache) -> dict[str, Any]:
    """Pass `cache` to a transformers decoder layer under the name its forward uses (`cache` in most 5.x models)."""
    return {cache_argument_name(layer): cache, "use_cache": True}


def _build_head(config: MTPConfig, trunk: Trunk) -> nn.Module:
    hidden_size = trunk.hidden_size
    std = float(getattr(trunk.config, "initializer_range", 0.02))
    init, dropout, num_layers = config.head_init, config.head_dropout, config.num_layers
    if config.head_type == "linear":
        return LinearHead(hidden_size, num_layers, init, std)
    if config.head_type == "ffn":
        return FFNHead(hidden_size, num_layers, init, std, dropout)
    if config.head_type == "mha_ffn":
        return MHAFFNHead(hidden_size, num_layers, _attention_heads(config, trunk), init, std, dropout)
    if config.head_type == "cnn":
        return CNNHead(hidden_size, num_layers, config.cnn_kernel_size, init, std, dropout)
    layers = trunk.copy_last_layers(num_layers)
    if init == "random":
        for layer in layers:
            _reinitialise(layer, trunk)
    if config.head_type == "identical":
        return DecoderLayersHead(layers)
    return SequentialHead(hidden_size, layers, init, std, _norm_eps(trunk))


def _norm_eps(trunk: Trunk) -> float:
    return float(getattr(trunk.config, "rms_norm_eps", None) or getattr(trunk.config, "layer_norm_eps", None) or 1e-6)


def _check_feature_layers(layers: Sequence[int], trunk: Trunk) -> list[int]:
    """`MTPConfig.feature_layers`, checked against the trunk's layer count (the last layer is the trunk output)."""
    last = len(trunk.layers) - 1
    bad = [index for index in layers if index >= last]
    if bad:
        raise ValueError(
            f"`feature_layers`={list(layers)} names layer(s) {bad}, but the base model's decoder layers are 0..{last} "
            f"and heads already read layer {last}'s output (the trunk output); use indices 0..{last - 1}."
        )
    return list(layers)


def _attention_heads(config: MTPConfig, trunk: Trunk) -> int:
    if config.mha_num_attention_heads is not None:
        if trunk.hidden_size % config.mha_num_attention_heads:
            raise ValueError(
                f"`mha_num_attention_heads`={config.mha_num_attention_heads} must divide the base model's hidden "
                f"size {trunk.hidden_size}."
            )
        return config.mha_num_attention_heads
    heads = getattr(trunk.config, "num_attention_heads", None) or 1
    return heads if trunk.hidden_size % heads == 0 else 1


def _reinitialise(layer: nn.Module, trunk: Trunk) -> None:
    """Give a copied decoder layer fresh weights with the base model's own initialiser."""
    with torch.no_grad():
        for module in layer.modules():
            trunk.model._init_weights(module)


def _copy_unembedding(unembedding: nn.Module) -> nn.Linear:
    weight = unembedding.weight
    copy = nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(unembedding, "bias", None) is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        copy.weight.copy_(weight)
        if copy.bias is not None:
            copy.bias.copy_(unembedding.bias)
    return copy
