"""Target runner: tree forward == causal forward of each path; KV compaction; errors.
The SmolLM2 KV test runs 20+ speculative rounds with rejections, then compares logits."""

import pytest
import torch

from coralline.engine import Engine
from coralline.sampling import SamplingParams
from coralline.tree import TokenTree

from .tiny import tiny_runner


def test_tree_forward_matches_causal_forward_of_every_path():
    r = tiny_runner(vocab=16, seed=1)
    prompt = [3, 5, 7, 9, 2]
    r.prefill(prompt)
    tree = TokenTree.from_paths(prompt[-1], [[1, 4, 6], [1, 8], [11], [12, 13]])
    out = r.tree_forward(tree)
    assert out.logits.shape == (tree.num_nodes, 16)
    assert out.features.shape == (tree.num_nodes, 32)
    for i in range(tree.num_nodes):
        ref = r.full_forward_logits(prompt[:-1] + list(tree.path_tokens(i)))
        assert torch.allclose(out.logits[i], ref, atol=1e-5), i


def test_commit_keeps_exactly_the_accepted_path():
    r = tiny_runner(vocab=16, seed=2)
    prompt = [3, 5, 7]
    r.prefill(prompt)
    tree = TokenTree.from_paths(prompt[-1], [[1, 4], [2, 6, 8]])  # nodes: 0, 1(1), 2(4), 3(2)...
    r.tree_forward(tree)
    accepted = [0, 3, 4]  # root -> 2 -> 6 (not contiguous: entries must move)
    r.commit(accepted)
    assert r.num_cached == len(prompt) - 1 + 3
    committed = [*prompt, 2, 6]
    out = r.tree_forward(TokenTree.chain(9, [10]))  # bonus 9 becomes the next root
    for i, path in enumerate([[9], [9, 10]]):
        ref = r.full_forward_logits(committed + path)
        assert torch.allclose(out.logits[i], ref, atol=1e-5)


def test_forward_costs_for_both_shapes():
    r = tiny_runner()
    for shape in ("tree", "chain"):
        ms = r.forward_costs(sizes=(1, 4), context=8, repeats=1, shape=shape)
        assert set(ms) == {1, 4} and all(v > 0 for v in ms.values())
    assert r.num_cached == 0  # the runner's sequence was reset
    with pytest.raises(ValueError, match="shape must be"):
        r.forward_costs(shape="star")


def test_runner_errors():
    r = tiny_runner()
    with pytest.raises(ValueError, match="no tokens"):
        r.prefill([])
    with pytest.raises(ValueError, match="context window"):
        r.prefill(list(range(10)) * 30)
    r.prefill([1, 2, 3])
    r.tree_forward(TokenTree.chain(3, [4]))
    with pytest.raises(ValueError, match="start at the root"):
        r.commit([1])
    with pytest.raises(ValueError, match="index the 2 fed nodes"):
        r.commit([0, 5])
    r.commit([0])
    big = TokenTree.chain(1, [2] * 300)
    with pytest.raises(ValueError, match="does not fit"):
        r.tree_forward(big)


@pytest.mark.slow
def test_kv_cache_after_many_rounds_with_rejections_on_smollm2(smollm2):
    """20+ rounds of n-gram tree speculation with rejections, then the next-token logits from
    the compacted cache equal a fresh forward of the whole committed sequence."""
    from coralline.draft.ngram import NgramConfig, NgramDrafter

    prompt = smollm2.encode("List the numbers from one to forty in words, separated by commas.")
    engine = Engine(smollm2, NgramDrafter(NgramConfig(min_ngram=1, max_paths=3, num_tokens=4)))
    out, rounds, rejected = [], 0, 0
    for chunk in engine.generate(prompt, SamplingParams(max_new_tokens=100)):
        out.extend(chunk.token_ids)
        rounds += 1
        rejected += chunk.stats.tree_nodes - 1 - chunk.stats.accepted
    assert rounds >= 20 and rejected > 0
    assert chunk.summary.finish_reason == "length"  # the last round was cut short: truncated
    committed = prompt + out
    # the runner still holds the sequence: one more step from its cache
    logits = smollm2.tree_forward(TokenTree.chain(committed[-1], [])).logits[0]
    smollm2.rollback()
    ref = smollm2.full_forward_logits(committed)
    assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()
