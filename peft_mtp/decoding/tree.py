"""Draft trees: shapes given as data (a list of paths), turned into index tensors and masks once.

A draft tree has a root, the token the model has already chosen (verified, not yet fed to it), and
one node per path. A path `(r1, r2, ..., rd)` is the node reached by taking head 1's candidate of
rank r1 (0 = its most likely token), then head 2's candidate of rank r2, and so on: the node sits
at depth d and holds head d's candidate of rank rd. Medusa stores its trees the same way. A chain
of depth m is the tree `[(0,), (0, 0), ..., (0,) * m]`.

Nodes are numbered root first, then by depth, then by path, so a parent always comes before its
children: the verify pass can feed them in this order with a mask that lets each node read its
ancestors only.

A tree can also carry a lookup branch (`DraftTree.with_lookup`): a chain of tokens that come from
elsewhere than the heads (prompt lookup, `lookup.py`), under the root or, where its first tokens are
the heads' best drafts (in every row that has lookup drafts), under the node of the heads' best chain
that already holds them, so that those tokens are not verified twice at the same place. Its nodes
come after the heads' nodes; their paths use the rank `LOOKUP` (-1) at each depth below the node
they hang from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Path = tuple[int, ...]

# The rank in the paths of lookup-branch nodes (never a head's candidate rank, which is >= 0).
LOOKUP = -1


def chain_paths(depth: int) -> list[Path]:
    """The paths of a chain of `depth` drafts (each head's top candidate, one after the other)."""
    return [(0,) * d for d in range(1, depth + 1)]


def default_tree_paths(depth: int) -> list[Path]:
    """A small tree for `depth` heads, sized for CPUs, where verifying a token costs nearly as much as a step.

    It keeps the top chain and adds the runner-up candidates where they pay most (near the root):
    3 candidates for head 1; head 2's best two under head 1's best and its best under head 1's runner-up;
    from depth 3 on, the top chain continues under the two best depth-2 nodes. 4 heads give 10 nodes
    (11 tokens verified per step, the root included).

    Args:
        depth: number of heads to draft with (>= 1).

    Returns:
        A list of paths (see the module docstring).
    """
    if depth < 1:
        raise ValueError(f"A draft tree needs depth >= 1, got {depth}.")
    paths: list[Path] = [(0,), (1,), (2,)]
    if depth >= 2:
        paths += [(0, 0), (0, 1), (1, 0)]
    for d in range(3, depth + 1):
        paths += [(0,) * d, (0, 1) + (0,) * (d - 2)]
    return paths


def default_chain_tree_paths(depth: int) -> list[Path]:
    """The default tree for `sequential` heads: the best chain, with runner-up candidates as leaves.

    A sequential head drafts depth k from the drafts of depths 1..k-1, so it ranks depth k's candidates
    for one chain only, the chain of best drafts: only nodes of that chain can have children. This tree
    adds head 1's second and third candidates and, at every deeper depth, the second candidate under the
    best chain. 2 heads give 5 nodes (6 tokens verified per step).

    Args:
        depth: number of heads to draft with (>= 1).

    Returns:
        A list of paths (see the module docstring) in which only the best chain branches.
    """
    if depth < 1:
        raise ValueError(f"A draft tree needs depth >= 1, got {depth}.")
    paths: list[Path] = [(0,), (1,), (2,)]
    for d in range(2, depth + 1):
        paths += [(0,) * d, (0,) * (d - 1) + (1,)]
    return paths


def check_branches_on_best_chain(paths: Sequence[Path]) -> None:
    """Refuse a tree that extends a node off the chain of best drafts (what `sequential` heads need).

    Args:
        paths: the tree's node paths.

    Raises:
        ValueError: a path extends a candidate of rank > 0, naming the path and the fix.
    """
    for path in paths:
        if any(isinstance(rank, int) and rank > 0 for rank in path[:-1]):  # bad ranks: `from_paths` says so
            raise ValueError(
                f"`mtp_tree` path {tuple(path)} extends a runner-up candidate, but `sequential` heads rank "
                "depth k's candidates only after the best drafts of depths 1..k-1 (each depth reads the previous "
                "draft). Keep children under the best chain only, e.g. [(0,), (1,), (0, 0), (0, 1)], or use "
                "`mtp_tree=True` (`default_chain_tree_paths`)."
            )


@dataclass
class DraftTree:
    """A draft tree turned into tensors (built once per `generate` call by `DraftTree.from_paths`).

    Attributes:
        paths: the node paths, in node order (node 0, the root, has the empty path).
        depths: `(N,)` depth of each node (root 0).
        parents: `(N,)` parent node of each node (root -1).
        ranks: `(N,)` candidate rank of each node within its head's top-k (root 0).
        ancestor_mask: `(N, N)` bool, `[i, j]` True iff node j is node i or one of its ancestors: what
            node i may read during verification.
        topk: `(D,)` number of candidates needed from head k (k = 1..D), `topk[k-1]`.
        is_chain: whether the tree is a single chain (verified with the model's own causal mask).
        lookup_length: nodes of the lookup branch (the last `lookup_length` nodes; 0 without one).
        lookup_start: depth of the node the lookup branch hangs from (0: the root; d: the heads' best
            draft at depth d, whose path is `(0,) * d`). Its j-th node sits at depth `lookup_start + j`.
    """

    paths: list[Path]
    depths: torch.Tensor
    parents: torch.Tensor
    ranks: torch.Tensor
    ancestor_mask: torch.Tensor
    topk: list[int]
    is_chain: bool
    lookup_length: int = 0
    lookup_start: int = 0

    @property
    def num_nodes(self) -> int:
        """Nodes including the root (the number of tokens one verify pass feeds per row)."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        """Depth of the deepest head node (the number of heads the tree drafts with)."""
        return len(self.topk)

    @property
    def max_node_depth(self) -> int:
        """Depth of the deepest node, lookup branch included (most drafts one step can accept)."""
        return max(self.depth, self.lookup_start + self.lookup_length)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], max_depth: int) -> DraftTree:
        """Validate a list of paths and build the tree's tensors.

        Args:
            paths: node paths, each a non-empty sequence of candidate ranks (>= 0), one per depth.
                Every prefix of a path must be a path too (a node needs its parent). An empty list
                gives the root alone (no drafts).
            max_depth: number of heads available (a path may not be longer).

        Returns:
            The `DraftTree`.

        Raises:
            ValueError: a path is empty, has a negative or non-integer rank, is repeated, is longer than
                `max_depth`, or lacks its parent.
        """
        normalised: list[Path] = []
        for path in paths:
            if isinstance(path, int):
                path = (path,)
            path = tuple(path)
            if not path or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
                raise ValueError(
                    f"`mtp_tree`: every path must be a non-empty tuple of candidate ranks >= 0, got {path!r}."
                )
            normalised.append(path)
        if len(set(normalised)) != len(normalised):
            raise ValueError(f"`mtp_tree` repeats a path: {sorted(p for p in normalised if normalised.count(p) > 1)}.")
        present = set(normalised)
        for path in normalised:
            if len(path) > max_depth:
                raise ValueError(
                    f"`mtp_tree` path {path} has depth {len(path)}, but the heads are only {max_depth} deep "
                    f"(`num_heads`); shorten it."
                )
            if len(path) > 1 and path[:-1] not in present:
                raise ValueError(f"`mtp_tree` path {path} lacks its parent {path[:-1]}; add it to the list.")

        return cls._build([()] + sorted(normalised, key=lambda p: (len(p), p)))

    def with_lookup(self, length: int, start: int = 0) -> DraftTree:
        """This tree with a lookup branch of `length` nodes (a chain) after its own nodes.

        Args:
            length: tokens the branch holds (>= 0; 0 gives this tree back).
            start: depth of the heads' best-chain node the branch hangs from (0: the root). The loop
                passes the number of leading lookup drafts that equal the heads' best drafts, so those
                are verified once, as the chain's nodes.

        Returns:
            The new `DraftTree`; its last `length` nodes are the branch, at depths start+1..start+length.

        Raises:
            ValueError: the tree already has a lookup branch, or has no best-chain node at depth `start`.
        """
        if length <= 0:
            return self
        if self.lookup_length:
            raise ValueError("This draft tree already has a lookup branch; add one to the heads' tree only.")
        stem = (0,) * start
        if stem not in self.paths:
            raise ValueError(f"A lookup branch can hang only from a node of the heads' best chain; this tree has no "
                             f"node {stem} (depth {start}).")
        branch = [stem + (LOOKUP,) * d for d in range(1, length + 1)]
        return self._build(self.paths + branch, lookup_length=length, lookup_start=start)

    @classmethod
    def _build(cls, ordered: list[Path], lookup_length: int = 0, lookup_start: int = 0) -> DraftTree:
        """The tensors of a tree whose paths are already in node order (root first, parents before children)."""
        index = {path: i for i, path in enumerate(ordered)}
        n = len(ordered)
        parents = torch.tensor([-1] + [index[p[:-1]] for p in ordered[1:]], dtype=torch.long)
        depths = torch.tensor([len(p) for p in ordered], dtype=torch.long)
        ranks = torch.tensor([0] + [p[-1] for p in ordered[1:]], dtype=torch.long)
        ancestor_mask = torch.zeros(n, n, dtype=torch.bool)
        for i, path in enumerate(ordered):
            for d in range(len(path) + 1):
                ancestor_mask[i, index[path[:d]]] = True
        head_depths = depths[ranks >= 0]  # the root and the heads' nodes
        depth = int(head_depths.max())  # 0 for the root alone (no drafts)
        topk = [int(ranks[(depths == d) & (ranks >= 0)].max()) + 1 for d in range(1, depth + 1)]
        # One node per depth is a chain (each node's parent sits one depth up); a heads' chain drafts top candidates.
        is_chain = n == int(depths.max()) + 1 and all(rank in (0, LOOKUP) for rank in ranks.tolist())
        return cls(ordered, depths, parents, ranks, ancestor_mask, topk, is_chain, lookup_length, lookup_start)

    def to(self, device: torch.device) -> DraftTree:
        """The same tree with its tensors on `device`."""
        return DraftTree(self.paths, self.depths.to(device), self.parents.to(device), self.ranks.to(device),
                         self.ancestor_mask.to(device), self.topk, self.is_chain, self.lookup_length,
                         self.lookup_start)

    def node_tokens(self, root: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
        """The token of every head node, per row (a lookup branch's tokens go after them).

        Args:
            root: `(B,)` the root token (the model's own choice, already verified).
            candidates: for each depth k = 1..D, `(B, topk[k-1])` head k's candidates, best first.

        Returns:
            `(B, N - lookup_length)` token ids in node order.
        """
        columns = [root[:, None]]
        for i in range(1, self.num_nodes - self.lookup_length):
            d, r = int(self.depths[i]), int(self.ranks[i])
            columns.append(candidates[d - 1][:, r : r + 1])
        return torch.cat(columns, dim=1)

    def accept(self, tokens: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """Find, per row, the deepest node whose whole path the model agrees with.

        Node i is accepted when its parent is accepted and its token is what the model chose at its
        parent (`choices[:, parent]`: the argmax for greedy, a fresh sample for sampling). The root is
        always accepted. The heads' sibling candidates are distinct tokens. A lookup branch's first
        token may repeat a head candidate under the root; greedy decoding may then follow either
        accepted path (both hold the model's argmax tokens), and sampling drops such a branch before
        verifying (`SpeculativeDecoder._lookup`): choosing the deeper of two paths after sampling
        below both would bias the distribution.

        Args:
            tokens: `(B, N)` node tokens (`node_tokens`).
            choices: `(B, N)` the model's choice of the token after each node.

        Returns:
            `(B,)` index of the deepest accepted node of each row (the first in node order on a tie).
        """
        return self.accept_by_source(tokens, choices)[0]

    def accept_by_source(
        self,
        tokens: torch.Tensor,
        choices: torch.Tensor,
        lookup_counts: torch.Tensor | None = None,
        depth_limit: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`accept`, with the depths the heads' nodes and the lookup branch reached.

        Args:
            tokens: `(B, N)` node tokens.
            choices: `(B, N)` the model's choice of the token after each node.
            lookup_counts: `(B,)` lookup drafts each row really has (draft i sits at depth i, the first
                `lookup_start` of them on the heads' chain); branch nodes deeper than that hold filler and are
                never accepted (default: all of them are drafts).
            depth_limit: `(B,)` deepest node each row may accept (its room for tokens, less the model's own
                next one); default: no limit.

        Returns:
            `(B,)` the deepest accepted node (the first in node order on a tie), `(B,)` the depth of the deepest
            accepted head node, and `(B,)` that of the deepest accepted lookup node (0 where none, or without a
            lookup branch; a branch under the heads' chain counts the chain's nodes above it).
        """
        accepted = self._accepted(tokens, choices, lookup_counts, depth_limit)
        depth_of_accepted = torch.where(accepted, self.depths[None, :], -1)
        heads = self.num_nodes - self.lookup_length
        head_depth = depth_of_accepted[:, :heads].amax(dim=1)
        lookup_depth = depth_of_accepted[:, heads:].amax(dim=1).clamp(min=0) if self.lookup_length else \
            torch.zeros_like(head_depth)
        return depth_of_accepted.argmax(dim=1), head_depth, lookup_depth

    def _accepted(self, tokens: torch.Tensor, choices: torch.Tensor, lookup_counts: torch.Tensor | None = None,
                  depth_limit: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, N)` bool: node accepted (its parent accepted and its token the model's choice there)."""
        batch = tokens.shape[0]
        accepted = torch.zeros(batch, self.num_nodes, dtype=torch.bool, device=tokens.device)
        accepted[:, 0] = True
        if self.num_nodes > 1:
            parents = self.parents[1:]
            match = tokens[:, 1:] == choices[:, parents]  # (B, N-1): node agrees with its parent's choice
            if self.lookup_length and lookup_counts is not None:
                depth = self.depths[None, -self.lookup_length :]  # the j-th branch node holds lookup draft start+j
                match[:, -self.lookup_length :] &= depth <= lookup_counts[:, None]
            if depth_limit is not None:
                match &= self.depths[None, 1:] <= depth_limit[:, None]
            # Parents come before children, so one sweep in node order propagates acceptance down the tree.
            for i in range(1, self.num_nodes):
                accepted[:, i] = match[:, i - 1] & accepted[:, int(self.parents[i])]
        return accepted

    def path_to(self, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nodes from the root to `node`, per row, padded at the end.

        Args:
            node: `(B,)` node indices.

        Returns:
            `(B, D + 1)` node indices along each path (root first; entries past the node repeat it; D is
            `max_node_depth`), and `(B,)` path lengths (node depth + 1).
        """
        lengths = self.depths[node] + 1
        depth = self.max_node_depth
        steps = [node]
        for _ in range(depth):
            steps.append(torch.where(self.parents[steps[-1]] >= 0, self.parents[steps[-1]], steps[-1]))
        stacked = torch.stack(steps[::-1], dim=1)  # (B, D + 1): ancestors first, the node repeated at the end
        # Rows whose node is shallower than D have the root repeated at the start; shift them left.
        shift = depth - self.depths[node]  # (B,)
        columns = torch.arange(depth + 1, device=node.device)[None, :] + shift[:, None]
        columns = columns.clamp(max=depth)
        return stacked.gather(1, columns), lengths
