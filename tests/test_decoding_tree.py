"""Draft trees as data, the row layout that rolls caches back, and the depth controller: small and exact."""

from __future__ import annotations

import pytest
import torch

from peft_mtp.decoding.layout import apply_keep, chunk_attention_mask, front_align, plan_keep, ragged_cat
from peft_mtp.decoding.options import DepthController
from peft_mtp.decoding.tree import (
    DraftTree,
    chain_paths,
    check_branches_on_best_chain,
    default_chain_tree_paths,
    default_tree_paths,
)


def test_tree_from_paths_orders_nodes_and_builds_the_ancestor_mask():
    tree = DraftTree.from_paths([(1,), (0, 0), (0,), (0, 1)], max_depth=3)
    assert tree.paths == [(), (0,), (1,), (0, 0), (0, 1)]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2]
    assert tree.topk == [2, 2]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree.ancestor_mask, expected)
    assert not tree.is_chain
    assert DraftTree.from_paths(chain_paths(3), 3).is_chain


def test_node_tokens_accept_and_path():
    tree = DraftTree.from_paths([(0,), (1,), (0, 0), (1, 0)], max_depth=2)
    root = torch.tensor([7, 7])
    candidates = [torch.tensor([[10, 11], [10, 11]]), torch.tensor([[20], [21]])]
    # Node 3 = (0, 0) holds head 2's best candidate: drafted from node 1's branch; node 4 = (1, 0) likewise.
    tokens = tree.node_tokens(root, candidates)
    assert tokens.tolist() == [[7, 10, 11, 20, 20], [7, 10, 11, 21, 21]]
    # Row 0: the model follows 11 then 20 (branch (1, 0)); row 1: it rejects both first candidates.
    choices = torch.tensor([[11, 99, 20, 0, 5], [12, 0, 0, 0, 0]])
    node = tree.accept(tokens, choices)
    assert node.tolist() == [4, 0]
    path, length = tree.path_to(node)
    assert length.tolist() == [3, 1]
    assert path[0, :3].tolist() == [0, 2, 4]
    assert path[1, 0].item() == 0


def test_default_tree_grows_with_depth_and_is_prefix_closed():
    for depth in range(1, 6):
        tree = DraftTree.from_paths(default_tree_paths(depth), depth)
        assert tree.depth == depth
    assert DraftTree.from_paths([], 3).num_nodes == 1  # the root alone: no drafts


def test_default_chain_tree_branches_on_the_best_chain_only():
    for depth in range(1, 6):
        paths = default_chain_tree_paths(depth)
        tree = DraftTree.from_paths(paths, depth)
        assert tree.depth == depth
        assert tree.num_nodes == 1 + 3 + 2 * (depth - 1)
        check_branches_on_best_chain(paths)
    assert default_chain_tree_paths(2) == [(0,), (1,), (2,), (0, 0), (0, 1)]
    with pytest.raises(ValueError, match=r"path \(0, 2, 0\) extends a runner-up"):
        check_branches_on_best_chain([(0,), (0, 0), (0, 2), (0, 2, 0)])


@pytest.mark.parametrize(
    ("paths", "message"),
    [([(0, 0)], "lacks its parent"), ([(0,), (0,)], "repeats"), ([(-1,)], "ranks >= 0"),
     ([(0,), (0, 0), (0, 0, 0)], "depth 3")],
)
def test_invalid_trees_are_refused(paths, message):
    with pytest.raises(ValueError, match=message):
        DraftTree.from_paths(paths, max_depth=2)


# ----------------------------------------------------------------------------------------------
# Layout


def test_plan_keep_crops_when_rows_agree():
    valid = torch.tensor([[True, True, True], [False, True, True]])
    plan = plan_keep(valid, chunk_width=4, keep=torch.tensor([2, 2]))
    assert plan.index is None and plan.length == 5
    cache = torch.arange(2 * 7).view(2, 7)
    assert apply_keep(cache, 1, plan).tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]


def test_plan_keep_realigns_rows_that_keep_different_entries():
    # Row 0: 2 old real entries, keeps chunk entries 0 and 2; row 1: 3 old, keeps chunk entry 0 only.
    valid = torch.tensor([[False, True, True], [True, True, True]])
    plan = plan_keep(valid, chunk_width=3, keep=torch.tensor([2, 1]), chunk_index=torch.tensor([[0, 2], [0, 0]]))
    values = torch.tensor([[-1, 10, 11, 20, 21, 22], [30, 31, 32, 40, 41, 42]])
    kept = apply_keep(values, 1, plan)
    assert plan.length == 4
    assert plan.valid.tolist() == [[True, True, True, True], [True, True, True, True]]
    assert kept.tolist() == [[10, 11, 20, 22], [30, 31, 32, 40]]
    # Any batch-first layout with positions on another dimension works the same (keys are (B, heads, S, D)).
    keys = values[:, None, :, None].expand(2, 3, 6, 4)
    assert torch.equal(apply_keep(keys, 2, plan), kept[:, None, :, None].expand(2, 3, 4, 4))


def test_plan_keep_pads_shorter_rows_on_the_left():
    valid = torch.tensor([[True, True], [True, True]])
    plan = plan_keep(valid, chunk_width=3, keep=torch.tensor([3, 1]))
    values = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    kept = apply_keep(values, 1, plan)
    assert plan.valid.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert kept[0].tolist() == [1, 2, 3, 4, 5] and kept[1, 2:].tolist() == [6, 7, 8]


def test_masks_and_ragged_helpers():
    mask = chunk_attention_mask(torch.tensor([[False, True]]), torch.tensor([[True, True, False]]))
    assert mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, False],
        [False, True, True, True, True],  # an invalid query still reads itself (no empty row)
    ]
    moved, lengths = front_align(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[False, True, True], [True] * 3]))
    assert moved[0, :2].tolist() == [5, 6] and lengths.tolist() == [2, 3]
    joined, joined_len = ragged_cat(torch.tensor([[1, 0], [2, 3]]), torch.tensor([1, 2]),
                                    torch.tensor([[4, 5], [6, 0]]), torch.tensor([2, 1]))
    assert joined_len.tolist() == [3, 3] and joined.tolist() == [[1, 4, 5], [2, 3, 6]]


def test_depth_controller_prefers_shallow_drafts_when_deep_ones_fail():
    controller = DepthController(max_depth=4, fixed=None, probe_every=100)
    for _ in range(40):
        depth = controller.choose()
        # Head 1 is always right, heads 2+ never; every extra verified token costs 20% of a step.
        controller.record(depth, [min(depth, 1)], seconds=1.0 + 0.2 * depth)
    assert controller.choose() == 1
    assert DepthController(max_depth=4, fixed=2).choose() == 2


def test_depth_controller_measures_the_shallower_depth_and_keeps_it_when_it_is_faster():
    # Measured from the deepest depth only, the prior (10% per verified token) makes depth 2 look best; each extra
    # token really costs 30% here, so depth 1 gives the most tokens per second (1.45 / 1.3 against 1.63 / 1.6).
    controller = DepthController(max_depth=2, fixed=None, probe_every=8)
    generator = torch.Generator().manual_seed(0)
    chosen = []
    for _ in range(400):
        depth = controller.choose()
        chosen.append(depth)
        first, second = (torch.rand(2, generator=generator) < torch.tensor([0.45, 0.4])).tolist()
        controller.record(depth, [0 if depth == 0 or not first else 1 if depth == 1 or not second else 2],
                          seconds=1.0 + 0.3 * depth)
    assert 0 in chosen[2:] and 2 in chosen[2:]  # both neighbours stay measured (steps 1-2 always use the deepest)
    assert chosen[-100:].count(1) >= 80


def _run_controller(step_seconds: list[float], acceptance: list[float], steps: int = 400,
                    draft_seconds: list[float] | None = None, catch_up: tuple[float, float] = (0.0, 0.0)) -> list[int]:
    """Depths a controller chooses when a step at depth d takes `step_seconds[d]` and draft k+1 is accepted with
    chance `acceptance[k]` once drafts 1..k were.

    `draft_seconds[d]` is the drafting part of such a step. `catch_up = (prompt, per_step)` models `sequential`
    heads: the first step also runs each depth over the prompt (`prompt` seconds more per depth), and a step deeper
    than the one before runs each depth that sat idle over the positions it skipped (`per_step` seconds per skipped
    step).
    """
    controller = DepthController(max_depth=len(acceptance), fixed=None, probe_every=8)
    generator = torch.Generator().manual_seed(1)
    chosen = []
    last_run = [-1] * (len(acceptance) + 1)  # the last step each depth drafted in (-1: not since the prompt)
    for step in range(steps):
        depth = controller.choose()
        chosen.append(depth)
        right = (torch.rand(depth, generator=generator) < torch.tensor(acceptance[:depth])).tolist()
        accepted = next((k for k, ok in enumerate(right) if not ok), depth)
        extra = sum(catch_up[0] if last_run[k] < 0 else catch_up[1] * (step - last_run[k] - 1)
                    for k in range(1, depth + 1))
        caught_up = depth > (chosen[-2] if step else 0)
        for k in range(1, depth + 1):
            last_run[k] = step
        draft = (draft_seconds[depth] if draft_seconds else 0.0) + extra
        controller.record(depth, [accepted], seconds=step_seconds[depth] + extra, draft_seconds=draft,
                          caught_up=caught_up)
    return chosen


def test_depth_controller_measures_the_baseline_and_stops_drafting_where_drafts_do_not_pay():
    # A CPU batch of 8: a step without drafts takes 100 ms, drafting steps 220-235 ms (ad hoc measurement on
    # SmolLM2-135M); 1.6 tokens at 220 ms lose to 1 token at 100 ms. A line through the drafting depths alone
    # puts depth 0 near 205 ms and would keep drafting.
    chosen = _run_controller([0.100, 0.220, 0.235], [0.6, 0.5])
    assert chosen[2] == 0  # measured on the third step, after both heads
    assert chosen[-200:].count(0) >= 170
    # Probes that confirm depth 0 space out (8, 16, 32, 64, 64... steps): 8 in 400 steps, not one every 8 steps.
    assert sum(depth > 0 for depth in chosen[3:]) <= 10


def test_depth_controller_spends_one_step_on_the_baseline_where_drafts_win_by_far():
    # A single row: drafting steps cost little more than plain ones and drafts are mostly right.
    chosen = _run_controller([0.060, 0.066, 0.072], [0.8, 0.8])
    assert chosen.count(0) == 1  # the one measurement of step 3
    assert chosen[-200:].count(2) >= 170


def test_depth_controller_does_not_charge_catching_up_to_the_deeper_depth():
    # Sequential heads on code (2026-12-04, SmolLM2-135M, CPU): depth 2 gains 2.19 tokens in 60 ms, depth 1 1.75 in
    # 56 ms, so depth 2 is faster. But the first step also runs the heads over the prompt, and a probe of depth 2
    # after a stretch at depth 1 runs head 2 over every position it skipped. Counted as depth 2's cost, those made
    # depth 1 look faster and kept the controller there.
    chosen = _run_controller([0.050, 0.056, 0.060], [0.75, 0.58], draft_seconds=[0.0, 0.004, 0.007],
                             catch_up=(0.4, 0.002))
    assert chosen[-200:].count(2) >= 180


def test_depth_controller_acceptance_fades_back_to_its_prior():
    controller = DepthController(max_depth=2, fixed=None)
    assert controller.acceptance(1) == controller.acceptance(2) == 0.5  # nothing seen: the prior
    for _ in range(3):
        controller.record(2, [1], seconds=1.0)  # draft 1 right, draft 2 wrong, three times
    assert controller.acceptance(2) < 0.3 and controller.acceptance(1) > 0.7
    for _ in range(200):
        controller.record(1, [1], seconds=1.0)  # draft 2 no longer tried: its counts fade
    assert abs(controller.acceptance(2) - 0.5) < 0.01
    assert controller.acceptance(1) > 0.95


def test_depth_controller_replaces_the_drafting_time_of_steps_that_caught_up():
    controller = DepthController(max_depth=3, fixed=None)
    # The first step drafts over the prompt: it stands in until the next step at its depth, which replaces it.
    controller.record(3, [0], seconds=1.0, draft_seconds=0.9, caught_up=True)
    assert controller.times == {3: 1.0}
    controller.record(3, [0], seconds=0.1, draft_seconds=0.03)
    assert controller.times[3] == pytest.approx(0.1) and controller.draft_times == {3: pytest.approx(0.03)}
    # A later step that catches up counts its depth's usual drafting time instead of its own.
    controller.record(3, [0], seconds=0.5, draft_seconds=0.43, caught_up=True)
    assert controller.times[3] == pytest.approx(0.1)
    # A depth only reached by catching up takes the nearest measured depth's, scaled by depth, and keeps averaging.
    controller.record(2, [0], seconds=0.5, draft_seconds=0.42, caught_up=True)
    assert controller.times[2] == pytest.approx(0.1)
    controller.record(2, [0], seconds=0.8, draft_seconds=0.6, caught_up=True)
    assert controller.times[2] == pytest.approx(0.7 * 0.1 + 0.3 * 0.22)
    with pytest.raises(ValueError, match="draft_seconds"):
        controller.record(2, [0], seconds=0.5, caught_up=True)
