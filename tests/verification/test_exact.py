"""Exact enumeration: every verifier, with its tree-sampling scheme, emits exactly the target's
law (TV < 1e-9), on V in {3, 4}, five shapes, flat/peaked rows, supports with holes, top-p.
Plus the invariants between verifiers and the negative controls that prove the check can fail.
"""

from functools import partial

import pytest

from coralline.rows import SparseRows
from coralline.verification import VERIFIERS
from coralline.verification.exact import (
    SHAPES,
    PrefixModel,
    emitted_law,
    expected_acceptance,
    extend_law,
    target_law,
    tv_distance,
)
from coralline.verification.traversal import Traversal, verify_traversal

from .cases import CONTEXT, LOSSLESS_SAMPLING, model_pairs, shapes_for

TV_TOL = 1e-9
PAIRS = model_pairs()


def _tv_to_target(fn, scheme, shape, target, draft, **kw) -> float:
    length = shape.depth + 1
    law = emitted_law(fn, scheme, shape, target, draft, CONTEXT, **kw)
    assert abs(sum(law.values()) - 1.0) < 1e-9
    return tv_distance(
        extend_law(law, target, CONTEXT, length), target_law(target, CONTEXT, length)
    )


@pytest.mark.parametrize("name", LOSSLESS_SAMPLING)
@pytest.mark.parametrize("pair", PAIRS, ids=[p[0] for p in PAIRS])
def test_verifier_is_lossless_by_enumeration(name, pair):
    _, target, draft = pair
    spec = VERIFIERS[name]
    for shape in shapes_for(name):
        if shape.name == "binary2" and target.vocab_size == 4 and spec.tree_kind == "sampled_iid":
            continue  # 4^6 i.i.d. trees x coins: covered on V = 3 and by the Monte Carlo test
        tv = _tv_to_target(spec.fn, spec.tree_kind, shape, target, draft)
        assert tv < TV_TOL, f"{name} on {shape.name}: TV {tv:.3g}"


@pytest.mark.parametrize("pair", PAIRS[:4], ids=[p[0] for p in PAIRS[:4]])
def test_traversal_with_sparse_draft_rows_is_lossless(pair):
    """The SparseRows fast path (O(K) residual masses) has the same exact law."""
    _, target, draft = pair
    for shape in SHAPES.values():
        tv = _tv_to_target(
            verify_traversal,
            "sampled_swor",
            shape,
            target,
            draft,
            draft_rows_as=SparseRows.from_dense,
        )
        assert tv < TV_TOL, f"sparse traversal on {shape.name}: TV {tv:.3g}"


def test_greedy_is_lossless_at_temperature_zero():
    for v in (3, 4):
        target = PrefixModel(v, 30 + v, "onehot")
        draft = PrefixModel(v, 40 + v, "flat", base=PrefixModel(v, 30 + v, "peaked"), noise=1.0)
        for shape in SHAPES.values():
            tv = _tv_to_target(VERIFIERS["greedy"].fn, "sampled_swor", shape, target, draft)
            assert tv < TV_TOL, f"greedy on {shape.name}: TV {tv:.3g}"


def test_traversal_equals_block_verification_on_chains():
    for _, target, draft in PAIRS:
        for shape in (SHAPES["chain3"], SHAPES["single"]):
            a = emitted_law(
                VERIFIERS["traversal"].fn, "sampled_swor", shape, target, draft, CONTEXT
            )
            b = emitted_law(VERIFIERS["block"].fn, "sampled_swor", shape, target, draft, CONTEXT)
            assert tv_distance(a, b) < 1e-12
            ea = sum(len(s) * p for s, p in a.items())
            eb = sum(len(s) * p for s, p in b.items())
            assert abs(ea - eb) < 1e-12


def test_traversal_equals_greedy_at_temperature_zero():
    for v in (3, 4):
        target = PrefixModel(v, 50 + v, "onehot")
        draft = PrefixModel(v, 60 + v, "flat")
        for shape in SHAPES.values():
            a = emitted_law(
                VERIFIERS["traversal"].fn, "sampled_swor", shape, target, draft, CONTEXT
            )
            b = emitted_law(VERIFIERS["greedy"].fn, "sampled_swor", shape, target, draft, CONTEXT)
            assert tv_distance(a, b) < 1e-12, shape.name


def test_traversal_never_accepts_less_than_rrsw():
    gains = []
    for seed in (0, 1, 2, 3, 7, 11):  # both vocabularies, flat and peaked, noise 0.5 to 2.3
        v = 3 + seed % 2
        target = PrefixModel(v, 100 + seed, "peaked" if seed % 3 else "flat")
        draft = PrefixModel(v, 200 + seed, "flat", base=target, noise=0.5 + seed / 6)
        for shape in (SHAPES["binary2"], SHAPES["unbalanced"], SHAPES["star3"]):
            t = expected_acceptance("traversal", "sampled_swor", shape, target, draft, CONTEXT)
            r = expected_acceptance("rrsw", "sampled_swor", shape, target, draft, CONTEXT)
            assert t >= r - 1e-12, (seed, shape.name, t, r)
            gains.append(t - r)
    assert max(gains) > 1e-3  # the comparison is not vacuous: traversal gains somewhere


class BonusFromOriginalRow(Traversal):
    """Mistake 1: the bonus comes from the ORIGINAL target row of the accepted node."""

    def bonus_row(self, node):
        return self.inp.target[node]


class NoDraftUpdate(Traversal):
    """Mistake 2: Ms(.|P) is not updated when a child of P is rejected."""

    def update_draft(self, row, x):
        pass


@pytest.mark.parametrize("broken", [BonusFromOriginalRow, NoDraftUpdate])
def test_negative_controls_fail_the_exact_check(broken):
    fn = partial(verify_traversal, impl=broken)
    worst = 0.0
    for _, target, draft in PAIRS[:4]:
        for shape in (SHAPES["binary2"], SHAPES["unbalanced"]):
            worst = max(worst, _tv_to_target(fn, "sampled_swor", shape, target, draft))
    assert worst > 1e-2, f"the broken traversal was not detected (TV {worst:.3g})"


def test_data_dependent_children_break_losslessness():
    """Why sampled trees use a template fixed before drawing (draft/trees.py): keeping the
    second SWOR child only when its draft probability is high biases the kept tokens, and
    traversal is then no longer lossless. The same code with the child always kept is."""
    from collections import defaultdict

    from coralline.tree import TokenTree
    from coralline.verification.exact import _child_sequences, outcome_law, tree_rows

    target, draft = PrefixModel(4, 15, "flat"), PrefixModel(4, 16, "flat")
    q = draft(CONTEXT)
    verify = VERIFIERS["traversal"].fn
    exact = target_law(target, CONTEXT, 2)
    for rule, expect_lossless in (("always", True), ("if_likely", False)):
        law: dict = defaultdict(float)
        for seq, prob in _child_sequences(q, 2, "sampled_swor"):
            keep = [seq[0]]
            if rule == "always" or float(q[seq[1]]) > 0.2:
                keep.append(seq[1])
            tree = TokenTree.from_parents([CONTEXT[-1], *keep], [-1] + [0] * len(keep))
            mb, ms = tree_rows(tree, target, CONTEXT), tree_rows(tree, draft, CONTEXT)

            def run(coins, tree=tree, mb=mb, ms=ms):
                return verify(tree, mb, ms, coins).emitted_tokens(tree)

            for out, p in outcome_law(run).items():
                law[out] += prob * p
        tv = tv_distance(extend_law(dict(law), target, CONTEXT, 2), exact)
        assert (tv < TV_TOL) == expect_lossless, (rule, tv)
