"""Monte Carlo on the real code path: trees drawn by Gumbel-top-k / multinomial / top-k with a
torch.Generator, verified with TorchCoins, continued with the target to a fixed length, and
compared with the target's exact law by a chi-square test (alpha = 1e-3, Bonferroni across
cases). 1e5 runs per verifier in total. The broken traversals must fail the same test.
"""

from collections import Counter
from functools import partial

import pytest
import torch
from scipy import stats

from coralline.sampling import make_generator, sample_without_replacement
from coralline.verification import VERIFIERS
from coralline.verification.exact import SHAPES, sample_tree, target_law, tree_rows
from coralline.verification.traversal import verify_traversal

from .cases import CONTEXT, LOSSLESS_SAMPLING, model_pairs
from .test_exact import BonusFromOriginalRow, NoDraftUpdate

RUNS_PER_VERIFIER = 40_000  # the exact enumeration (test_exact) is the proof; this checks that
# the verifiers' sampling matches it (chi-square, cells pooled to >= MIN_EXPECTED)
ALPHA = 1e-3
MIN_EXPECTED = 20
PAIRS = model_pairs()
MC_PAIRS = PAIRS[1:]  # all but the unrelated pair: deep acceptances happen


def _mc_counts(fn, scheme, shape, target, draft, runs, seed) -> Counter:
    g = make_generator(seed)
    length = shape.depth + 1
    ctx = tuple(CONTEXT[:-1])
    counts: Counter = Counter()
    for _ in range(runs):
        tree = sample_tree(shape, draft, CONTEXT, scheme, g)
        mb = tree_rows(tree, target, CONTEXT)
        ms = tree_rows(tree, draft, CONTEXT)
        seq = tuple(fn(tree, mb, ms, g).emitted_tokens(tree))
        while len(seq) < length:  # continue with the exact target
            row = target((*ctx, CONTEXT[-1], *seq))
            seq += (int(torch.multinomial(row, 1, generator=g)),)
        counts[seq] += 1
    return counts


def _chi2_pvalue(counts: Counter, law: dict, runs: int) -> float:
    keys = sorted(law)
    assert set(counts) <= set(keys), "emitted a sequence the target cannot produce"
    expected = [runs * law[k] for k in keys]
    observed = [counts.get(k, 0) for k in keys]
    # merge bins with small expected counts into one: the chi-square tail is only accurate
    # when every bin expects enough hits (with 5, a Poisson bin inflates significance ~4x)
    big = [i for i, e in enumerate(expected) if e >= MIN_EXPECTED]
    small = [i for i, e in enumerate(expected) if e < MIN_EXPECTED]
    exp = [expected[i] for i in big] + ([sum(expected[i] for i in small)] if small else [])
    obs = [observed[i] for i in big] + ([sum(observed[i] for i in small)] if small else [])
    scale = sum(obs) / sum(exp)  # exact law sums to 1 up to 1e-15; keep scipy's check happy
    return float(stats.chisquare(obs, [e * scale for e in exp]).pvalue)


def _cases(name):
    shapes = ["chain3"] if VERIFIERS[name].chain_only else ["binary2", "unbalanced"]
    return [(pair, SHAPES[s]) for pair in MC_PAIRS for s in shapes]


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSLESS_SAMPLING)
def test_monte_carlo_chi_square(name):
    spec = VERIFIERS[name]
    cases = _cases(name)
    runs = RUNS_PER_VERIFIER // len(cases)
    alpha = ALPHA / len(cases)
    for k, ((pid, target, draft), shape) in enumerate(cases):
        counts = _mc_counts(spec.fn, spec.tree_kind, shape, target, draft, runs, seed=1000 + k)
        law = target_law(target, CONTEXT, shape.depth + 1)
        p = _chi2_pvalue(counts, law, runs)
        assert p > alpha, f"{name} on {pid}/{shape.name}: chi-square p = {p:.2e}"


@pytest.mark.slow
def test_greedy_monte_carlo_at_temperature_zero():
    """At T = 0 the law is a point mass: every run must emit the target's greedy tokens."""
    from coralline.verification.exact import PrefixModel

    target = PrefixModel(4, 70, "onehot")
    draft = PrefixModel(4, 71, "flat", base=PrefixModel(4, 70, "peaked"), noise=0.5)
    law = target_law(target, CONTEXT, 3)
    assert len(law) == 1
    counts = _mc_counts(
        VERIFIERS["greedy"].fn, "sampled_swor", SHAPES["binary2"], target, draft, 5000, seed=3
    )
    assert list(counts) == list(law)


@pytest.mark.slow
@pytest.mark.parametrize("broken", [BonusFromOriginalRow, NoDraftUpdate])
def test_negative_controls_fail_the_chi_square(broken):
    fn = partial(verify_traversal, impl=broken)
    _, target, draft = PAIRS[2]  # a case of the positive test; both mistakes shift TV by > 0.1
    shape = SHAPES["binary2"]
    runs = 20_000
    counts = _mc_counts(fn, "sampled_swor", shape, target, draft, runs, seed=5)
    p = _chi2_pvalue(counts, target_law(target, CONTEXT, shape.depth + 1), runs)
    assert p < ALPHA / 2, f"the broken traversal passed the chi-square (p = {p:.3g})"


def test_sample_tree_uses_swor_order():
    """Sanity of the Monte Carlo tree sampler: children follow the Gumbel-top-k order."""
    _, _, draft = PAIRS[3]
    g1, g2 = make_generator(9), make_generator(9)
    tree = sample_tree(SHAPES["star3"], draft, CONTEXT, "sampled_swor", g1)
    expected = sample_without_replacement(draft(CONTEXT), 3, g2).tolist()
    assert list(tree.token_list[1:]) == expected
