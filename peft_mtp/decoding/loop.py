"""The optimised speculative decoding loop (KV-cached, batched, chain or tree drafts).

Each step, per active row: the heads draft from the last verified position; one forward pass of the
model over [the token it chose last step, drafts...] (with its KV cache) verifies them; the longest
agreeing path plus the model's own next token are emitted; the cache keeps the accepted path and
drops the rest; the same pass gives the trunk outputs the heads draft from next. Rows accept
different numbers of tokens and finish at different steps; the cached state stays right-aligned
(`layout.py`) and finished rows leave the batch.

The loop runs as transformers' `custom_generate` callable: `generate` prepares the generation
config, logits processors, stopping criteria, attention mask and position ids, and this loop reuses
them. `reference.py` holds the same algorithm without caches, in a few readable lines.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..copying import mix_copy, next_copy_candidate
from ..fast_linear import fast_small_row_linear
from .acceptance import sample, speculative_sample_chain
from .attention import grouped_query_sdpa, uses_sdpa
from .drafter import HeadDrafter
from .layout import additive_mask, apply_keep, chunk_attention_mask, plan_keep, select_rows
from .lookup import prompt_lookup
from .options import MIN_LOOKUP_NGRAM, STRONG_LOOKUP_NGRAM, DepthController, DraftShapes, SpeculationOptions
from .stats import SpeculationStats
from .tree import DraftTree

if TYPE_CHECKING:
    from ..model import MTPModel
    from .corpus import NgramCorpus

# `_drop_finished` returns this when no row left the batch (nothing to select).
ALL_ROWS = None


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' `GenerateDecoderOnlyOutput` plus `mtp_stats` (a `SpeculationStats`)."""

    mtp_stats: SpeculationStats | None = None


class StopRules:
    """transformers' stopping criteria, applied token by token to the several tokens a step emits.

    `MaxLengthCriteria` and `EosTokenCriteria` are applied vectorised; any other criterion (stop
    strings, max time, user criteria) is called on each row's ids after each emitted token, exactly
    when plain decoding would have called it.

    Args:
        criteria: the prepared `StoppingCriteriaList`.
    """

    def __init__(self, criteria: StoppingCriteriaList):
        self.max_length: int | None = None
        eos: list[torch.Tensor] = []
        self.others = []
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria):
                self.max_length = min(self.max_length or criterion.max_length, criterion.max_length)
            elif isinstance(criterion, EosTokenCriteria):
                eos.append(criterion.eos_token_id.flatten())
            else:
                self.others.append(criterion)
        self.eos = torch.cat(eos) if eos else None
        # transformers pads finished rows (and lets them finish one by one) only when an eos criterion exists.
        self.finish_individually = any(hasattr(criterion, "eos_token_id") for criterion in criteria)

    def first_stop(self, sequences: torch.Tensor, lengths: torch.Tensor, emitted: torch.Tensor,
                   counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut each row's emitted tokens at the first one after which a criterion stops the row.

        Args:
            sequences: `(R, L)` each row's ids so far (padded prompt included), valid up to `lengths`.
            lengths: `(R,)`.
            emitted: `(R, E)` tokens emitted this step.
            counts: `(R,)` how many of them each row emits.

        Returns:
            The cut counts `(R,)` and whether each row stopped `(R,)`.
        """
        device = emitted.device
        stopped = torch.zeros_like(counts, dtype=torch.bool)
        if self.max_length is not None:
            room = self.max_length - lengths
            stopped |= counts >= room
            counts = torch.minimum(counts, room)
        if self.eos is not None:
            within = torch.arange(emitted.shape[1], device=device)[None, :] < counts[:, None]
            is_eos = torch.isin(emitted, self.eos.to(device)) & within
            has_eos = is_eos.any(dim=1)
            counts = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, counts)
            stopped |= has_eos
        if self.others:
            counts_list, stopped_list, length_list = counts.tolist(), stopped.tolist(), lengths.tolist()
            for row in range(len(counts_list)):
                for i in range(counts_list[row]):
                    candidate = torch.cat([sequences[row, : length_list[row]], emitted[row, : i + 1]])[None]
                    if any(bool(criterion(candidate, None).any()) for criterion in self.others):
                        counts_list[row], stopped_list[row] = i + 1, True
                        break
            counts = torch.tensor(counts_list, device=device)
            stopped = torch.tensor(stopped_list, device=device)
        return counts, stopped


def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    *,
    mtp_model: MTPModel,
    options: SpeculationOptions,
    streamer=None,
    **model_kwargs: Any,
):
    """transformers `custom_generate` callable: speculative decoding with the active MTP heads.

    Args:
        model: the base causal LM (transformers passes it first).
        input_ids: `(B, P)` prompt ids, left-padded.
        logits_processor: prepared `LogitsProcessorList` (sampling warpers included when sampling).
        stopping_criteria: prepared `StoppingCriteriaList`.
        generation_config: the prepared `GenerationConfig` (greedy or sampling, one sequence per prompt).
        mtp_model: the `MTPModel` whose active heads draft.
        options: the speculation options.
        streamer: receives the prompt (from `generate`), then each column of new tokens as plain
            decoding would send it.
        **model_kwargs: what `generate` prepared for the model (attention mask, position ids, cache, ...).

    Returns:
        `(B, P + N)` token ids, or an `MTPGenerateOutput` with `mtp_stats` when
        `generation_config.return_dict_in_generate`.
    """
    decoder = SpeculativeDecoder(model, mtp_model, options, logits_processor, stopping_criteria, generation_config,
                                 streamer)
    use_fast_linear = options.fast_linear and input_ids.device.type == "cpu"
    with fast_small_row_linear(mtp_model) if use_fast_linear else contextlib.nullcontext():
        return decoder.run(input_ids, model_kwargs)


class SpeculativeDecoder:
    """State and steps of one speculative `generate` call (see the module docstring)."""

    def __init__(self, model, mtp_model: MTPModel, options: SpeculationOptions, logits_processor,
                 stopping_criteria: StoppingCriteriaList, generation_config, streamer=None):
        self.model = model
        self.trunk = mtp_model.get_trunk()
        self.heads = mtp_model.active_heads()
        self.options = options
        self.processors = logits_processor if logits_processor is not None and len(logits_processor) else None
        self.stop = StopRules(stopping_criteria)
        if self.stop.max_length is None:  # `generate` always adds one (`max_length` defaults to 20); others may not
            raise ValueError("Speculative decoding needs a length limit: a `MaxLengthCriteria` among the stopping "
                             "criteria (what `generate` makes of `max_new_tokens` or `max_length`).")
        self.config = generation_config
        self.do_sample = bool(generation_config.do_sample)
        self.streamer = streamer
        num_heads = self.heads.num_heads
        max_depth = options.max_depth(num_heads)
        sequential = self.heads.head_type == "sequential"
        self.shapes = DraftShapes(options.tree_paths(max_depth, sequential=sequential), num_heads)
        _check_tree_width(self.shapes.tree(self.shapes.max_depth), self.heads, self.trunk.vocab_size)
        fixed = None if options.depth == "auto" else min(options.depth, self.shapes.max_depth)
        sizes = [self.shapes.tree(depth).num_nodes for depth in range(self.shapes.max_depth + 1)]
        self.controller = DepthController(self.shapes.max_depth, fixed, sizes=sizes)
        self.drafter = HeadDrafter(self.heads, self.trunk)
        self.drafted_depth = 0  # the last step's depth: no sequential depth has run over the prompt yet
        self.stats = SpeculationStats(num_heads=num_heads, trace=[] if options.trace else None)
        if not self.shapes.is_chain:
            _check_tree_attention(model)
        self.lookup_tokens = options.lookup_tokens(_takes_tree_masks(model))
        self.grouped_sdpa = uses_sdpa(model)  # verify passes on CPU read grouped key/value heads in place

    # ------------------------------------------------------------------------------------------

    def run(self, input_ids: torch.LongTensor, model_kwargs: dict[str, Any]):
        start = time.perf_counter()
        device = input_ids.device
        batch, prompt_length = input_ids.shape
        pad = self.config._pad_token_tensor
        self.pad_id = int(pad.flatten()[0]) if pad is not None else 0
        self.sequences = input_ids.new_full((batch, self.stop.max_length), self.pad_id)
        self.sequences[:, :prompt_length] = input_ids
        self.lengths = torch.full((batch,), prompt_length, dtype=torch.long, device=device)  # padded prompt included
        mask = model_kwargs.get("attention_mask")
        prompt_valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if bool((prompt_valid[:, 1:] < prompt_valid[:, :-1]).any()):
            raise ValueError(
                "Speculative decoding needs left padding (`attention_mask` zeros only before each row's tokens); "
                "set `tokenizer.padding_side = 'left'`, or pass `mtp_speculate=False`."
            )
        self.left_pad = (~prompt_valid).sum(dim=1)  # (B,) per original row
        self.rows = torch.arange(batch, device=device)  # original index of each active row
        self.done_at = torch.full((batch,), -1, dtype=torch.long, device=device)  # length when a criterion fired
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.streamed = 0
        self.prompt_length = prompt_length

        # Prefill, as transformers does it, with the trunk output captured for the heads.
        self.cache = DynamicCache()  # full-attention layers only, so that rows can be realigned freely
        model_kwargs["cache"] = self.cache
        inputs = self.model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
        with self.trunk.capture(feature_layers=self.heads.feature_layers) as captured:
            outputs = self.model(**inputs, return_dict=True)
        self.cache = outputs.cache if getattr(outputs, "cache", None) is not None else self.cache
        self.cache_valid = prompt_valid
        position_ids = model_kwargs.get("position_ids")
        self.next_position = (position_ids[:, -1] + 1) if position_ids is not None else prompt_valid.sum(dim=1)
        scores = self._process(input_ids, outputs.logits[:, -1].float())
        token = sample(scores) if self.do_sample else scores.argmax(dim=-1)
        self.stats.prefill_time_s = time.perf_counter() - start
        self._emit(token[:, None], torch.ones(batch, dtype=torch.long, device=device))
        self.stats.model_forwards += 1
        self.stats.prefill_tokens = batch
        self.root = token
        keep_rows = self._drop_finished()
        if self.rows.numel():
            tick = time.perf_counter()
            head_input = self.heads.head_input(captured.hidden, captured.layer_outputs)
            self.drafter.observe(_select(head_input, keep_rows), _select(prompt_valid, keep_rows))
            self.stats.draft_time_s += time.perf_counter() - tick

        while self.rows.numel():
            self._step()

        self.stats.wall_time_s = time.perf_counter() - start
        if self.streamer is not None:
            self.streamer.end()
        return self._output()

    # ------------------------------------------------------------------------------------------
    # One step

    def _step(self) -> None:
        step_start = tick = time.perf_counter()
        depth = self.controller.choose()
        draft_room = self._room() - 1  # (R,) drafts each row may still accept before the model's own next token
        depth = max(0, min(depth, int(draft_room.max())))  # no drafts past the last allowed token
        head_tree = self.shapes.tree(depth).to(self.rows.device)
        tokens, draft_probs = self._draft(head_tree, depth)  # (R, N) node tokens, root first
        lookup, lookup_counts, strong = (self._lookup(tokens, head_tree, draft_room) if self._lookup_now()
                                         else (None, None, False))
        tree = head_tree
        if lookup_counts is not None:
            # Beside a strong branch (every row's from a long match) only the heads' best chain is verified.
            narrow = strong and not head_tree.is_chain  # a chain has no runner-ups to leave out
            # Lookup drafts that repeat the heads' best chain are verified once, as the chain's nodes.
            start = 0 if self.do_sample else self._drafts_shared_with_chain(tokens, depth, lookup, lookup_counts)
            length = int(lookup_counts.max()) - start
            tree = self.shapes.tree(depth, length, chain_only=narrow, lookup_start=start).to(self.rows.device)
            if narrow:
                tokens = tokens[:, self.shapes.chain_nodes[depth]]
            tokens = torch.cat([tokens, lookup[:, start : start + tree.lookup_length]], dim=1)
        draft_seconds = time.perf_counter() - tick
        self.stats.draft_time_s += draft_seconds

        verify_start = time.perf_counter()
        logits, hidden = self._verify(tokens, tree)
        scores = self._process_nodes(logits, tokens, tree)
        if self.do_sample and tree.is_chain and not tree.lookup_length and draft_probs is not None:
            # The heads' own sampled chain (a lookup branch, even one on the chain, is verified node by node below).
            accepted, bonus = speculative_sample_chain(scores, draft_probs, tokens[:, 1:])
            node, head_accepted, lookup_accepted = accepted, accepted, None
        else:
            choices = sample(scores) if self.do_sample else scores.argmax(dim=-1)  # (R, N)
            node, head_accepted, lookup_accepted = tree.accept_by_source(tokens, choices, lookup_counts,
                                                                         depth_limit=draft_room)
            bonus = choices.gather(1, node[:, None])[:, 0]
        path, keep = tree.path_to(node)  # (R, D + 1), (R,): the accepted nodes, root first
        emitted = torch.cat([tokens.gather(1, path)[:, 1:], bonus[:, None]], dim=1)  # (R, D + 1)
        # `emitted[r, :keep[r]]` are the new tokens: the accepted drafts, then the model's own next token.
        emitted = torch.where(torch.arange(emitted.shape[1], device=emitted.device)[None] == (keep - 1)[:, None],
                              bonus[:, None], emitted)
        # The heads' statistics and the depth controller count the heads' own drafts, whichever branch won.
        head_list = head_accepted.tolist()
        self.stats.record_step(depth, head_list)
        if lookup_counts is not None:
            self.stats.record_lookup(lookup_counts.tolist(), head_list, lookup_accepted.tolist())
        if self.stats.trace is not None:
            self.stats.trace.append(list(zip(self.rows.tolist(), (keep - 1).tolist())))
        self._emit(emitted, keep)

        # Roll the cache back to the accepted path; the next step feeds `bonus`.
        plan = plan_keep(self.cache_valid, tokens.shape[1], keep, path)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = apply_keep(layer.keys, 2, plan)
                layer.values = apply_keep(layer.values, 2, plan)
        self.cache_valid = plan.valid
        self.next_position = self.next_position + keep
        self.root = bonus
        kept_hidden = hidden.gather(1, path[..., None].expand(-1, -1, hidden.shape[-1]))  # (R, D + 1, H) front
        kept_valid = torch.arange(path.shape[1], device=path.device)[None] < keep[:, None]
        keep_rows = self._drop_finished()
        self.stats.verify_time_s += time.perf_counter() - verify_start
        if self.rows.numel():
            tick = time.perf_counter()
            self.drafter.observe(_select(kept_hidden, keep_rows), _select(kept_valid, keep_rows))
            self.stats.draft_time_s += time.perf_counter() - tick
        # Sequential depths that sat idle last step caught up on the positions they skipped in this one.
        caught_up = self.drafter.sequential and depth > self.drafted_depth
        self.drafted_depth = depth
        self.controller.record(depth, head_list, time.perf_counter() - step_start, draft_seconds=draft_seconds,
                               caught_up=caught_up)

    def _lookup_now(self) -> bool:
        """Whether this step drafts from prompt lookup.

        A number given as `mtp_lookup` drafts at every step. The automatic setting drafts for greedy
        decoding of a single row: in a batch the branch widens every row's verify pass (on this CPU it
        cost more than it gained at 8 rows, docs/decoding.md), and in sampling a step with the branch
        verifies the heads' sampled chain by exact match instead of by speculative sampling, which
        accepts it less often.
        """
        if self.options.lookup is not None:
            return self.lookup_tokens > 0
        return self.lookup_tokens > 0 and not self.do_sample and self.rows.numel() == 1

    def _lookup(self, head_tokens: torch.Tensor, head_tree: DraftTree,
                room: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """Prompt-lookup drafts of the active rows `(R, L)`, their counts `(R,)`, and whether the branch is strong.

        The match runs over each row's verified tokens and the root (the last emitted token), so the
        drafts continue after the root, as the heads' do. No row drafts past its last allowed token.
        The branch is strong when every row's drafts come from a match of at least `STRONG_LOOKUP_NGRAM`
        tokens of its own text. `(None, None, False)` when no row drafts.

        Args:
            head_tokens: `(R, N)` the heads' node tokens of this step.
            head_tree: their tree.
            room: `(R,)` drafts each row may still accept.
        """
        num_tokens = min(self.lookup_tokens, int(room.max()))
        if num_tokens <= 0:
            return None, None, False
        lengths = self.lengths[self.rows]
        drafts, counts, ngram = prompt_lookup(
            self.sequences[:, : int(lengths.max())][self.rows], self.left_pad[self.rows], lengths, num_tokens,
            max_ngram=self.options.lookup_ngram, min_ngram=min(MIN_LOOKUP_NGRAM, self.options.lookup_ngram),
            return_ngram=True)
        corpus = self.options.lookup_corpus
        if corpus is not None and not bool(counts.all()):
            drafts, counts = self._corpus_drafts(corpus, drafts, counts, lengths, num_tokens)
        counts = torch.minimum(counts, room.clamp(min=0))
        if self.do_sample:
            # Two accepted nodes with the same token under the root would let the samples below them choose
            # the path (biased); a branch that starts with a head candidate is dropped instead.
            first = head_tokens[:, head_tree.depths == 1]  # (R, candidates of head 1)
            counts = torch.where((first == drafts[:, :1]).any(dim=1), 0, counts)
        if not bool(counts.any()):
            return None, None, False
        return drafts, counts, bool(((ngram >= STRONG_LOOKUP_NGRAM) & (counts > 0)).all())

    def _drafts_shared_with_chain(self, tokens: torch.Tensor, depth: int, lookup: torch.Tensor,
                                  counts: torch.Tensor) -> int:
        """How many leading lookup drafts equal the heads' best drafts, in every row that has lookup drafts.

        The branch then hangs from the chain's node at that depth instead of the root: on code, 239 of 301
        lookup proposals began with the heads' first draft (docs/decoding.md, "Narrower passes").

        Args:
            tokens: `(R, N)` the heads' node tokens of this step (tree `self.shapes.tree(depth)`).
            depth: the draft depth.
            lookup: `(R, L)` lookup drafts.
            counts: `(R,)` real lookup drafts per row (0: none).
        """
        chain = tokens[:, self.shapes.chain_nodes[depth][1:]]  # (R, C): the heads' best drafts, depth 1 first
        width = min(chain.shape[1], lookup.shape[1])
        same = (chain[:, :width] == lookup[:, :width]).long().cumprod(dim=1).sum(dim=1)
        same = torch.minimum(same, counts)[counts > 0]
        return int(same.min()) if same.numel() else 0

    def _corpus_drafts(self, corpus: NgramCorpus, drafts: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor,
                       num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`drafts` and `counts` with the corpus's drafts filled in for the rows the prompt lookup left empty."""
        drafts, counts = drafts.clone(), counts.clone()
        starts = torch.maximum(self.left_pad[self.rows], lengths - corpus.max_ngram)
        for i in (counts == 0).nonzero()[:, 0].tolist():
            row = self.rows[i]
            tokens = corpus.draft(self.sequences[row, int(starts[i]) : int(lengths[i])].tolist(), num_tokens)
            if tokens:
                drafts[i, : len(tokens)] = torch.tensor(tokens, dtype=drafts.dtype, device=drafts.device)
                counts[i] = len(tokens)
        return drafts, counts

    def _draft(self, tree: DraftTree, depth: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Node tokens `(R, N)` (root first) and, for sampled chains, the draft distributions `(R, depth, V)`.

        Tree candidates are each head's top-k; `sequential` heads rank depth k's after the best drafts of
        depths 1..k-1 (their trees branch on that chain only). Heads that copy (`MTPConfig.copy_ngram`) draft
        from their distributions with their copy candidates mixed in (`peft_mtp.copying`).
        """
        root = self.root
        if depth == 0:
            return root[:, None], None
        copying = self.heads.copy_gates is not None
        if self.drafter.sequential:
            probs: list[torch.Tensor] = []
            candidates: list[torch.Tensor] = []  # trees: each depth's top-k, ranked after the best chain
            chain: list[torch.Tensor] = []  # the drafts depths 1..k-1 chose, which depth k reads

            def pick(k: int, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
                copy = self._copy_candidates(chain, [1])[:, 0] if copying else None
                if not tree.is_chain or not self.do_sample:
                    width = 1 if tree.is_chain else tree.topk[k - 1]
                    if copy is not None:
                        best = self.heads.copy_topk(hidden, self.trunk, copy, width, head=k, slot_logits=logits)
                    else:
                        best = self.heads.token_ids(logits.topk(width, dim=-1).indices)
                    if not tree.is_chain:
                        candidates.append(best)
                    chain.append(best[:, 0])  # the chain goes on from the best candidate
                    return chain[-1]
                scores = self._process_rows(self.heads.full_vocab_logits(logits).float())
                probs.append(self._with_copy(torch.softmax(scores, dim=-1), hidden, copy, k))
                chain.append(torch.multinomial(probs[-1], 1)[:, 0])
                return chain[-1]

            drafts = self.drafter.draft_chain(depth, self._verified_tokens, self._num_verified(), pick)
            if not tree.is_chain:
                return tree.node_tokens(root, candidates), None
            return torch.cat([root[:, None], drafts], dim=1), (torch.stack(probs, dim=1) if probs else None)
        logits = self.drafter.head_logits(tree.depth)  # (R, D, N), one unembedding matmul for all heads
        hidden = self.drafter.last_hidden[:, : tree.depth]
        # Parallel head k drafts the token k after the root: its candidate is k tokens after the match.
        copy = self._copy_candidates([], list(range(1, tree.depth + 1))) if copying else None
        if self.do_sample and tree.is_chain:
            full = self.heads.full_vocab_logits(logits)  # (R, D, V): processors and acceptance work on token ids
            probs = torch.stack([self._with_copy(torch.softmax(self._process_rows(full[:, k].float()), dim=-1),
                                                 hidden[:, k], None if copy is None else copy[:, k], k + 1)
                                 for k in range(tree.depth)], dim=1)
            drafts = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:2])
            return torch.cat([root[:, None], drafts], dim=1), probs
        if copy is not None:
            candidates = [self.heads.copy_topk(hidden[:, k], self.trunk, copy[:, k], tree.topk[k], head=k + 1,
                                               slot_logits=logits[:, k]) for k in range(tree.depth)]
        else:
            candidates = [self.heads.token_ids(logits[:, k].topk(tree.topk[k], dim=-1).indices)
                          for k in range(tree.depth)]
        return tree.node_tokens(root, candidates), None

    def _copy_candidates(self, chain: list[torch.Tensor], offsets: list[int]) -> torch.Tensor:
        """`(R, len(offsets))` copy candidates after each active row's tokens and `chain` drafts (-1: none).

        Args:
            chain: `(R,)` drafts that follow the root, in order (a sequential chain's depths so far).
            offsets: distances from the last of those tokens to the drafted one.
        """
        lengths = self.lengths[self.rows]
        end = int(lengths.max())
        tokens = self.sequences[self.rows, :end]
        if chain:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], len(chain))], dim=1)
            columns = lengths[:, None] + torch.arange(len(chain), device=tokens.device)[None]
            tokens = tokens.scatter(1, columns, torch.stack(chain, dim=1))
        ngram, starts = self.heads.copy_ngram, self.left_pad[self.rows]
        return torch.stack([next_copy_candidate(tokens, lengths + len(chain), ngram, offset, starts)
                            for offset in offsets], dim=1)

    def _with_copy(self, probs: torch.Tensor, hidden: torch.Tensor, copy: torch.Tensor | None,
                   k: int) -> torch.Tensor:
        """Head k's sampling distribution `(R, V)` with its copy candidate mixed in (`copying.mix_copy`)."""
        if copy is None:
            return probs
        gates = self.heads.copy_gate_logits(hidden, self.trunk, copy, k=k)
        return mix_copy(probs.log(), copy, gates).exp()

    def _verify(self, tokens: torch.Tensor, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass over the node tokens with the KV cache; returns logits and trunk outputs `(R, N, .)`."""
        rows, nodes = tokens.shape
        position_ids = self.next_position[:, None] + tree.depths[None, :]
        if tree.is_chain:
            # A chain is verified exactly like plain decoding feeds tokens: 2-D padding mask, causal.
            if bool(self.cache_valid.all()):
                attention_mask = None
            else:
                attention_mask = torch.cat([self.cache_valid, self.cache_valid.new_ones(rows, nodes)], dim=1).long()
        else:
            # A tree: each node reads the cached prefix and its own ancestors. transformers passes a 4-D
            # mask through unchanged (masking_utils._preprocess_mask_arguments), so it must already be
            # in the additive form eager and SDPA attention add to their scores.
            allowed = chunk_attention_mask(self.cache_valid, self.cache_valid.new_ones(rows, nodes), tree.ancestor_mask)
            attention_mask = self._tree_attention_mask(allowed, position_ids)
        in_place = self.grouped_sdpa and tokens.device.type == "cpu"
        with grouped_query_sdpa(in_place), self.trunk.capture(feature_layers=self.heads.feature_layers) as captured:
            outputs = self.model(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=self.cache, use_cache=True, return_dict=True)
        self.cache = outputs.cache if getattr(outputs, "cache", None) is not None else self.cache
        return outputs.logits, self.heads.head_input(captured.hidden, captured.layer_outputs)

    def _tree_attention_mask(self, allowed: torch.Tensor, position_ids: torch.Tensor):
        """The additive 4-D mask(s) of a tree verify pass, sliding windows included where the model has them.

        Models whose layers mix full and sliding-window attention (`config.layer_types`) take a dict
        of one mask per layer type; models where every layer slides (Mistral-style `sliding_window`)
        take one mask with the window applied. The window is the model's own rule on positions:
        a query at position q reads keys at positions > q - sliding_window.
        """
        dtype = self.trunk.unembedding.weight.dtype
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if not window or (layer_types and "sliding_attention" not in layer_types):
            return additive_mask(allowed, dtype)
        # Position of every key: cached real entries end just before `next_position`.
        after = self.cache_valid.flip(1).long().cumsum(1).flip(1)  # real entries at or after each column
        key_positions = torch.cat([self.next_position[:, None] - after, position_ids], dim=1)  # (R, S + N)
        in_window = key_positions[:, None, :] > position_ids[:, :, None] - window  # (R, N, S + N)
        sliding = allowed & in_window[:, None]
        if layer_types:
            return {"full_attention": additive_mask(allowed, dtype), "sliding_attention": additive_mask(sliding, dtype)}
        return additive_mask(sliding, dtype)

    # ------------------------------------------------------------------------------------------
    # Logits processors

    def _process(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.processors is None else self.processors(ids, scores)

    def _process_rows(self, scores: torch.Tensor, suffix: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the processors to `(R, V)` scores; row r's prefix is its ids, then `suffix[r]` if given.

        Processors may hold per-row state sized for the whole batch (e.g. the repetition penalty's
        prompt lengths), so they always see all the original rows. Rows are grouped by prefix length
        and the processors run once per distinct length (once for batch 1 or rows in step), each time
        on the ids plain decoding would give them at that point; the other rows are placeholders.
        """
        if self.processors is None:
            return scores
        out = scores.clone()
        lengths = self.lengths[self.rows]
        for length in lengths.unique().tolist():
            members = (lengths == length).nonzero()[:, 0]
            rows = self.rows[members]
            ids = self.sequences[:, :length]
            if suffix is not None:
                extra = suffix.new_zeros(ids.shape[0], suffix.shape[1])
                extra[rows] = suffix[members]
                ids = torch.cat([ids, extra], dim=1)
            full = scores.new_zeros(ids.shape[0], scores.shape[1])
            full[rows] = scores[members]
            out[members] = self.processors(ids, full)[rows]
        return out

    def _process_nodes(self, logits: torch.Tensor, tokens: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """Processed scores `(R, N, V)` at every node, each with its own prefix (verified ids + its path)."""
        scores = logits.float()
        if self.processors is None:
            return scores
        scores = scores.clone()
        for node in range(tree.num_nodes):
            path = tree.paths[node]
            ancestors = [tree.paths.index(path[:d]) for d in range(1, len(path) + 1)]
            scores[:, node] = self._process_rows(scores[:, node], tokens[:, ancestors])
        return scores

    # ------------------------------------------------------------------------------------------
    # Tokens, stopping, streaming, rows

    def _room(self) -> torch.Tensor:
        """How many more tokens each active row may get `(R,)`."""
        lengths = self.lengths[self.rows]
        limit = torch.full_like(lengths, self.stop.max_length)
        target = self._target_length()
        if target is not None:
            limit = limit.clamp(max=target)
        return limit - lengths

    def _target_length(self) -> int | None:
        # Without an eos criterion, transformers stops every row at the step the last row stops at.
        if self.stop.finish_individually or bool((self.done_at < 0).any()):
            return None
        return int(self.done_at.max())

    def _emit(self, emitted: torch.Tensor, counts: torch.Tensor) -> None:
        """Write each active row's first `counts[r]` emitted tokens, applying the stopping criteria."""
        rows = self.rows
        lengths = self.lengths[rows]
        cut, stopped = self.stop.first_stop(self.sequences[rows], lengths, emitted, counts)
        newly_done = stopped & (self.done_at[rows] < 0)
        self.done_at[rows] = torch.where(newly_done, lengths + cut, self.done_at[rows])
        # Rows finish one by one only with an eos criterion; otherwise they run on until the last one stops.
        count = cut if self.stop.finish_individually else counts
        # Negative where a row ran on past the length the last row just stopped the batch at: it is taken back.
        count = torch.minimum(count, self._room())
        columns = lengths[:, None] + torch.arange(emitted.shape[1], device=emitted.device)[None]
        write = torch.arange(emitted.shape[1], device=emitted.device)[None] < count[:, None]
        self.sequences[rows[:, None].expand_as(columns)[write], columns[write]] = emitted[write]
        self.lengths[rows] = lengths + count
        self.stats.new_tokens += int(count.sum())
        if self.stop.finish_individually:
            self.finished[rows] = stopped
        target = self._target_length()
        if target is not None:
            self.finished[rows] = self.lengths[rows] >= target
        if self.stop.max_length is not None:
            self.finished[rows] |= self.lengths[rows] >= self.stop.max_length
        self._stream()

    def _stream(self) -> None:
        """Send every column of new tokens that all rows have now decided (finished rows send the pad)."""
        if self.streamer is None:
            return
        target = self._target_length()
        while True:
            column = self.prompt_length + self.streamed
            if target is not None and column >= target:
                return
            decided = (self.lengths > column) | self.finished
            if not bool(decided.all()) or not bool((self.lengths > column).any()):
                return
            self.streamer.put(self.sequences[:, column].cpu())
            self.streamed += 1

    def _drop_finished(self) -> torch.Tensor | None:
        """Remove finished rows from every batched state; returns the positions kept (`ALL_ROWS`: all of them)."""
        active = ~self.finished[self.rows]
        if bool(active.all()):
            return ALL_ROWS
        index = active.nonzero()[:, 0]
        self.rows = self.rows[index]
        if not self.rows.numel():
            return index
        self.root = self.root[index]
        self.next_position = self.next_position[index]
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        self.cache_valid = self.cache_valid.index_select(0, index)
        self.drafter.select_rows(index)
        # Columns that are padding in every remaining row are dropped.
        lead = int((~self.cache_valid).long().cumprod(dim=1).sum(dim=1).min())
        if lead:
            self.cache_valid = self.cache_valid[:, lead:]
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[:, :, lead:]
                    layer.values = layer.values[:, :, lead:]
        return index

    def _num_verified(self) -> torch.Tensor:
        """Verified real tokens per active row (prompt without padding, plus generated)."""
        return self.lengths[self.rows] - self.left_pad[self.rows]

    def _verified_tokens(self, positions: torch.Tensor) -> torch.Tensor:
        """Token ids at `(R, W)` positions (0 = each row's first real token) of the active rows."""
        columns = positions + self.left_pad[self.rows][:, None]
        return self.sequences[self.rows[:, None], columns]

    def _output(self):
        target = self._target_length()
        generated = target if target is not None else int(self.lengths.max())
        sequences = self.sequences[:, :generated]
        if not self.config.return_dict_in_generate:
            return sequences
        return MTPGenerateOutput(sequences=sequences, mtp_stats=self.stats)


def _select(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return tensor if rows is ALL_ROWS else select_rows(tensor, rows)


def _check_tree_width(tree: DraftTree, heads, vocab_size: int) -> None:
    """Refuse a tree that asks a head for more candidates than it has tokens to rank.

    Args:
        tree: the full draft tree of the call.
        heads: the active `MTPHeadStack` (its draft vocabulary, if any, bounds the ranks).
        vocab_size: the model's vocabulary size.
    """
    width = heads.draft_vocab.size if heads.draft_vocab is not None else vocab_size
    for k, topk in enumerate(tree.topk, start=1):
        if topk > width:
            where = "draft vocabulary (`draft_vocab_size`)" if heads.draft_vocab is not None else "vocabulary"
            raise ValueError(
                f"`mtp_tree` asks head {k} for its top {topk} candidates, but the heads' {where} has {width} tokens; "
                f"use paths whose entries at depth {k} are below {width}"
                + (", or heads with a larger `draft_vocab_size`." if heads.draft_vocab is not None else ".")
            )


def _takes_tree_masks(model) -> bool:
    """Whether the model's attention takes the additive 4-D mask a tree verify pass gives it."""
    return getattr(model.config, "_attn_implementation", None) in ("eager", "sdpa")


def _check_tree_attention(model) -> None:
    """Refuse tree drafts where a custom 4-D mask would be ignored or misread."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if not _takes_tree_masks(model):
        raise ValueError(
            f"Tree drafts pass a 4-D attention mask, which transformers' {implementation!r} attention does not take; "
            "load the model with attn_implementation='sdpa' or 'eager', or use `mtp_tree=None`."
        )
