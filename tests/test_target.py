"""Target runner: tree forward == causal forward of each path; KV compaction; errors.
The SmolLM2 KV test runs 20+ speculative rounds with rejections, then compares logits.
Every test runs over both KV caches: the reference DynamicKV and a pooled session of the batch
scheduler (batching/), whose forwards go through the ragged batched forward."""

import pytest
import torch

from coralline.engine import Engine
from coralline.sampling import SamplingParams
from coralline.tree import TokenTree

from .tiny import tiny_runner

KINDS = pytest.mark.parametrize("kind", ["dynamic", "pooled"])


@KINDS
def test_tree_forward_matches_causal_forward_of_every_path(kind):
    r = tiny_runner(vocab=16, seed=1, kv=kind)
    prompt = [3, 5, 7, 9, 2]
    r.prefill(prompt)
    tree = TokenTree.from_paths(prompt[-1], [[1, 4, 6], [1, 8], [11], [12, 13]])
    out = r.tree_forward(tree)
    assert out.logits.shape == (tree.num_nodes, 16)
    assert out.features.shape == (tree.num_nodes, 32)
    for i in range(tree.num_nodes):
        ref = r.full_forward_logits(prompt[:-1] + list(tree.path_tokens(i)))
        assert torch.allclose(out.logits[i], ref, atol=1e-5), i


@KINDS
def test_commit_keeps_exactly_the_accepted_path(kind):
    r = tiny_runner(vocab=16, seed=2, kv=kind)
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


@KINDS
def test_forward_costs_for_both_shapes(kind):
    r = tiny_runner(kv=kind)
    for shape in ("tree", "chain"):
        ms = r.forward_costs(sizes=(1, 4), context=8, repeats=1, shape=shape)
        assert set(ms) == {1, 4} and all(v > 0 for v in ms.values())
    assert r.num_cached == 0  # the runner's sequence was reset
    with pytest.raises(ValueError, match="shape must be"):
        r.forward_costs(shape="star")


@KINDS
def test_runner_errors(kind):
    r = tiny_runner(kv=kind)
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
@KINDS
def test_kv_cache_after_many_rounds_with_rejections_on_smollm2(smollm2, kind):
    """20+ rounds of n-gram tree speculation with rejections, then the next-token logits from
    the compacted cache equal a fresh forward of the whole committed sequence."""
    from coralline.batching.scheduler import pooled
    from coralline.draft.ngram import NgramConfig, NgramDrafter

    if kind == "pooled":
        smollm2 = pooled(smollm2).fork()
    prompt = smollm2.encode("Count from 1 to 30, and after every number write its square.")
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


@KINDS
def test_the_runner_tracks_the_cached_ids_and_features(kind):
    r = tiny_runner(vocab=16, seed=2, kv=kind)
    prompt = [3, 5, 7]
    feats = r.prefill(prompt)  # [2, d]
    assert r.ids == [3, 5] and r.reused == 0
    assert torch.equal(r.cached_features(), feats)
    tree = TokenTree.from_paths(prompt[-1], [[1, 4], [2, 6, 8]])
    out = r.tree_forward(tree)
    r.commit([0, 3, 4])  # root 7 -> 2 -> 6
    assert r.ids == [3, 5, 7, 2, 6] and r.num_cached == 5
    assert torch.equal(r.cached_features()[2:], out.features[[0, 3, 4]])
    r.tree_forward(TokenTree.chain(9, [10]))
    r.truncate(4)  # drops the uncommitted tree, then the cached tail
    assert r.ids == [3, 5, 7, 2] and r.cached_features().shape == (4, 32)
    r.reset()
    assert r.ids == [] and r.cached_features().shape == (0, 32)
    assert r.fork().ids == []


@KINDS
@pytest.mark.parametrize("prompt", [[3, 5, 7, 9, 2, 4, 6, 1], [3], [4, 8]])
def test_prefill_root_is_prefill_then_the_roots_forward_in_one_forward(kind, prompt):
    """prefill_root == prefill + tree_forward(root_only(last)): the same features, the same
    root logits and feature, the same state (the root fed, not committed), one forward (the
    pooled path in chunks of 3, the root's row in the last one)."""
    a, b = tiny_runner(vocab=16, seed=8, kv=kind), tiny_runner(vocab=16, seed=8, kv=kind)
    calls = []
    inner = a.kv.forward
    a.kv.forward = lambda *args, **kw: calls.append(1) or inner(*args, **kw)
    feats, out = a.prefill_root(prompt)
    want = b.prefill(prompt)
    ref = b.tree_forward(TokenTree.root_only(prompt[-1]))
    assert len(calls) == 1
    assert feats.shape == want.shape == (len(prompt) - 1, 32)
    assert torch.allclose(feats, want, atol=1e-5)
    assert out.logits.shape == ref.logits.shape == (1, 16)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert torch.allclose(out.features, ref.features, atol=1e-5)
    assert a.ids == b.ids == prompt[:-1] and a.num_cached == len(prompt) - 1
    assert a.kv.length() == b.kv.length() == len(prompt)
    a.commit([0])  # then the rounds go on as after tree_forward
    b.commit([0])
    assert a.ids == b.ids == prompt and torch.allclose(
        a.cached_features(), b.cached_features(), atol=1e-5
    )
    nxt = TokenTree.from_paths(2, [[1, 4], [5]])
    assert torch.allclose(a.tree_forward(nxt).logits, b.tree_forward(nxt).logits, atol=1e-5)


@KINDS
def test_prefill_root_with_reuse_forwards_the_new_tokens_and_the_root(kind):
    r, fresh = tiny_runner(vocab=16, seed=6, kv=kind), tiny_runner(vocab=16, seed=6, kv=kind)
    r.prefill([3, 5, 7, 9, 2])
    r.tree_forward(TokenTree.chain(2, [4, 6]))
    r.commit([0, 1])  # cached: 3 5 7 9 2 4
    for prompt, kept in [([3, 5, 7, 9, 2, 4, 6, 1, 8], 6), ([3, 5, 7, 9, 2, 4, 6, 1, 8], 8)]:
        feats, out = r.prefill_root(prompt, reuse=True)
        assert r.reused == kept and r.ids == prompt[:-1]
        want = fresh.prefill(prompt)
        assert torch.allclose(feats, want, atol=1e-5)
        assert torch.allclose(out.logits[0], fresh.full_forward_logits(prompt), atol=1e-5)
        r.rollback()  # (the root was fed: the same prompt again reuses every cached token)


@KINDS
def test_prefill_with_reuse_forwards_only_the_new_tokens(kind):
    """The kept prefix plus the forwarded rest: the same features and next-token logits as a
    fresh prefill (up to rounding), and `reused` says how much was kept."""
    r, fresh = tiny_runner(vocab=16, seed=6, kv=kind), tiny_runner(vocab=16, seed=6, kv=kind)
    first = [3, 5, 7, 9, 2]
    r.prefill(first)
    r.tree_forward(TokenTree.chain(2, [4, 6]))
    r.commit([0, 1])  # cached: 3 5 7 9 2 4 (the root 6 is not cached)
    for prompt, kept in [
        ([3, 5, 7, 9, 2, 4, 6, 1, 8], 6),  # extends the committed sequence
        ([3, 5, 7, 9, 2, 4, 6, 1, 8], 8),  # the same prompt again: nothing to forward
        ([3, 5, 7, 9, 11, 12], 4),  # diverges after 4 tokens: the cache is cropped there
        ([1, 2, 3], 0),  # nothing in common: a full prefill
        ([1], 0),
    ]:
        feats = r.prefill(prompt, reuse=True)
        assert r.reused == kept and r.ids == prompt[:-1] and r.num_cached == len(prompt) - 1
        want = fresh.prefill(prompt)
        assert feats.shape == want.shape and torch.allclose(feats, want, atol=1e-5)
        got = r.tree_forward(TokenTree.chain(prompt[-1], [])).logits[0]
        r.rollback()
        assert torch.allclose(got, r.full_forward_logits(prompt), atol=1e-5)
    r.prefill([3, 5, 7, 9], reuse=False)
    assert r.reused == 0


@pytest.mark.gpu
def test_prefill_with_reuse_on_cuda():
    """The cached features stay on the device; a reused prefix matches a fresh prefill."""
    from coralline.target import TargetConfig, TargetRunner

    r = TargetRunner.load(TargetConfig(device="cuda", dtype="bfloat16"))
    ids = r.encode("Name three colours.")
    r.prefill(ids)
    r.tree_forward(TokenTree.chain(ids[-1], [504, 1092]))
    r.commit([0, 1, 2])
    prompt = [*ids, 504, 1092, 314, 28]
    feats = r.prefill(prompt, reuse=True)
    assert r.reused == len(ids) + 1 and feats.is_cuda and feats.dtype == torch.float32
    want = r.fork().prefill(prompt)
    assert feats.shape == want.shape  # equal up to bf16 rounding of different matmul shapes
    assert torch.nn.functional.cosine_similarity(feats, want, dim=1).min() > 0.99


def test_take_rows_slices_a_chain_and_gathers_a_branch():
    from coralline.target import take_rows

    x = torch.arange(12.0).view(6, 2)  # [6, 2]
    chain = take_rows(x, (0, 1, 2))
    assert torch.equal(chain, x[[0, 1, 2]]) and chain.data_ptr() == x.data_ptr()  # a view
    branch = take_rows(x, [0, 2, 5])
    assert torch.equal(branch, x[[0, 2, 5]]) and branch.data_ptr() != x.data_ptr()
    assert take_rows(x, [0]).shape == (1, 2)
