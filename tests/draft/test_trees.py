"""Tree shapes and the budget chooser (pure functions)."""

import pytest

from coralline.draft.trees import (
    AcceptanceStats,
    CostModel,
    LookupRate,
    choose_budget,
    select_dynamic,
    template,
    template_values,
)


def test_cost_model_interpolates_and_extrapolates():
    c = CostModel(table={1: 1.0, 4: 2.0, 8: 3.0}, draft_cost=0.5)
    assert c.target(1) == 1.0 and c.target(8) == 3.0
    assert c.target(6) == pytest.approx(2.5)
    assert c.target(12) == pytest.approx(4.0)
    assert c.round_cost(4) == pytest.approx(2.5)
    m = CostModel.measured({1: 50.0, 8: 100.0})
    assert m.table == {1: 1.0, 8: 2.0} and m.t1_ms == 50.0
    m.observe_draft_ms(100.0)
    assert m.draft_cost > 0.3


def test_budget_grows_with_draft_confidence():
    cost = CostModel(table={1: 1.0, 8: 1.5, 16: 2.0, 64: 4.0}, draft_cost=0.2)
    confident = [0.9**k for k in range(1, 64)]
    hopeless = [0.01] * 63
    big = choose_budget(confident, cost, sizes=(1, 8, 16, 64))
    assert big >= 16
    assert choose_budget(hopeless, cost, sizes=(1, 8, 16, 64)) == 1
    # calibration scales the expected gain: an over-confident draft gets a smaller tree
    assert choose_budget(confident, cost, calibration=0.1, sizes=(1, 8, 16, 64)) < big


def test_select_dynamic_keeps_ancestors_and_orders_parents_first():
    # candidates: 0,1 children of the root; 2 child of 0; 3 child of 2; 4 child of 1
    parents = [-1, -1, 0, 2, 1]
    scores = [-0.1, -0.5, -0.3, -0.6, -2.0]
    keep = select_dynamic(parents, scores, budget=5)  # 4 candidates
    assert set(keep) == {0, 1, 2, 3}
    pos = {c: i for i, c in enumerate(keep)}
    assert pos[0] < pos[2] < pos[3]
    with pytest.raises(ValueError, match="must not increase"):
        select_dynamic([-1, 0], [-1.0, -0.5], budget=2)


def test_template_is_a_prefix_closed_tree_of_the_budget():
    alpha = [0.7, 0.2, 0.1]
    for budget in (1, 2, 5, 12, 30):
        parents = template(alpha, budget, max_depth=4)
        assert len(parents) == budget
        assert parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents[1:], 1))
        kids: dict[int, int] = {}
        depth = [0] * budget
        for i, p in enumerate(parents[1:], 1):
            kids[p] = kids.get(p, 0) + 1
            depth[i] = depth[p] + 1
        assert max(depth) <= 4
        assert all(v <= len(alpha) for v in kids.values())
    values = template_values(alpha, 12, 4)
    assert values[0] == pytest.approx(0.7) and len(values) == 11
    assert values == sorted(values, reverse=True)  # the greedy adds nodes best first


def test_acceptance_stats_learn_the_accepted_rank():
    stats = AcceptanceStats()
    children = [(1, 2), (), ()]
    before = stats.alpha[1]
    for _ in range(100):
        stats.update(children, [0, 2])  # the rank-1 child is always the accepted one
    assert stats.alpha[1] > before and stats.alpha[1] > 0.8
    assert stats.alpha[0] < 0.1
    stats.update(children, [0], predicted=2.0)
    assert stats.calibration < 1.0


def test_lookup_rate_counts_reached_and_accepted_lookup_tokens():
    from coralline.tree import TokenTree

    # root 9 -> 1 -> 2 -> 3 (the lookup chain), root -> 5 (a head node)
    tree = TokenTree.from_parents([9, 1, 2, 3, 5], [-1, 0, 1, 2, 0])
    rate = LookupRate()
    for _ in range(60):
        rate.update([1, 2, 3, 4], tree, [0, 1, 2])  # 3 of the chain in the tree, 2 accepted
    assert rate.rate == pytest.approx(2 / 3, abs=0.01)
    for _ in range(60):
        rate.update([1, 2], tree, [0, 4])  # the head's node won: 1 reached, 0 accepted
    assert rate.rate < 0.1  # forgets the old successes (decay 0.95 per round)
    before = rate.rate
    rate.update([7, 8], tree, [0])  # the budget left the chain out: nothing learned
    assert rate.rate == before
