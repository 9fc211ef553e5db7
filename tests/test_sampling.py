"""Warping, SWOR sampling and SamplingParams validation."""

import math

import pytest
import torch
from scipy import stats

from coralline.sampling import (
    SamplingParams,
    TorchCoins,
    categorical,
    make_generator,
    sample_without_replacement,
    warp,
)


def test_temperature_zero_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    p = warp(logits, temperature=0.0)
    assert p.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0, 0.5])
    assert torch.allclose(warp(logits, 0.5), torch.softmax(logits / 0.5, dim=0))


def test_top_k_keeps_k_largest():
    p = warp(torch.tensor([1.0, 4.0, 3.0, 2.0]), 1.0, top_k=2)
    assert p[0] == 0 and p[3] == 0
    assert torch.allclose(p[1:3], torch.softmax(torch.tensor([4.0, 3.0]), 0))


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = warp(probs.log(), 1.0, top_p=0.75)
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    p = warp(probs.log(), 1.0, top_p=0.8)  # exactly reached by the first two
    assert (p > 0).tolist() == [True, True, False, False]
    p = warp(probs.log(), 1.0, top_p=0.01)  # always at least one token
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": -3}, "seed"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_sampling_params_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_single_stop_string():
    p = SamplingParams(stop="\n\n")
    assert p.stop == ("\n\n",) and p.greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_categorical_never_returns_zero_mass_tokens():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    seen = {categorical(probs, u) for u in [0.0, 0.25, 0.4999, 0.5, 0.9999999, 1.0 - 1e-17]}
    assert seen == {1, 3}
    with pytest.raises(ValueError, match="no probability mass"):
        categorical(torch.zeros(3), 0.5)


def test_swor_order_law_matches_sequential_draws():
    """Gumbel-top-2 on 4 tokens: chi-square of the 12 ordered pairs against the exact law."""
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    g = make_generator(123)
    n = 30000
    counts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        pair = tuple(sample_without_replacement(q, 2, g).tolist())
        counts[pair] = counts.get(pair, 0) + 1
    pairs = [(a, b) for a in range(4) for b in range(4) if a != b]
    expected = [n * float(q[a] * q[b] / (1 - q[a])) for a, b in pairs]
    observed = [counts.get(p, 0) for p in pairs]
    assert sum(observed) == n
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_swor_respects_support_and_is_seeded():
    q = torch.tensor([0.0, 0.7, 0.0, 0.3])
    out = sample_without_replacement(q, 5, make_generator(0))
    assert sorted(out.tolist()) == [1, 3]
    a = sample_without_replacement(torch.full((50,), 0.02), 10, make_generator(7))
    b = sample_without_replacement(torch.full((50,), 0.02), 10, make_generator(7))
    assert torch.equal(a, b) and len(set(a.tolist())) == 10


def test_torch_coins_are_reproducible_and_uniform():
    c1, c2 = TorchCoins(make_generator(5)), TorchCoins(make_generator(5))
    draws = [c1.uniform() for _ in range(200)]
    assert draws == [c2.uniform() for _ in range(200)]
    assert stats.kstest(draws, "uniform").pvalue > 1e-4
