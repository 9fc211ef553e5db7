"""The drafter contract (draft/base.py): what a drafter is told, checked for every drafter."""

import itertools

import pytest
import torch

from coralline.draft.base import DraftInput, DraftProposal, FeatureCount
from coralline.draft.coral import CoralHead, config_for_target
from coralline.draft.coral_drafter import CoralDrafter, CoralDrafterConfig
from coralline.engine import Engine, EngineConfig
from coralline.sampling import DRAFT, VERIFY, SamplingParams, keyed_generator, keyed_seed
from coralline.target import TargetRunner
from coralline.tree import TokenTree

from ..tiny import tiny_llama


def _coral(vocab=16, seed=5, **kw):
    target = tiny_llama(vocab, seed=seed)
    torch.manual_seed(seed)
    head = CoralHead(config_for_target(target, "tiny", num_groups=4, active_groups=2))
    head.attach(target)
    head.init_groups()
    cfg = CoralDrafterConfig(depth=2, max_nodes=8, draft_top_k=6, **kw)
    return target, CoralDrafter(head, cfg)


def test_feature_rows_must_match_the_committed_tokens():
    count = FeatureCount()
    assert count.advance(DraftInput((1, 2, 3), torch.zeros(2, 4))) == 2  # prompt minus root
    assert count.advance(DraftInput((4, 5), torch.zeros(2, 4))) == 2  # previous root + 4
    with pytest.raises(ValueError, match="expected 1 feature rows"):
        count.advance(DraftInput((6,), torch.zeros(2, 4)))


def test_draft_input_validates_accepted():
    with pytest.raises(ValueError, match="from the root"):
        DraftInput((1,), None, accepted=(1, 2))
    with pytest.raises(ValueError, match="at least one"):
        DraftInput((), None)
    assert DraftInput([1, 2], None, accepted=[0, 3]).accepted == (0, 3)


def test_coral_refuses_a_wrong_feature_count():
    target, drafter = _coral()
    runner = TargetRunner(target, None)
    feats = runner.prefill([1, 2, 3, 4])  # [3, d]
    with pytest.raises(ValueError, match="expected 3 feature rows"):
        drafter.propose(DraftInput((1, 2, 3, 4), feats[:2]), SamplingParams())


class Recorder:
    """Wraps a drafter and records what the engine tells it."""

    def __init__(self, inner, fail_every: int = 0):
        self.inner, self.steps, self.fail_every = inner, [], fail_every
        self.name, self.tree_kind, self.chain_only = inner.name, inner.tree_kind, inner.chain_only
        self.proposals = []

    def reset(self):
        self.inner.reset()

    def propose(self, step, params):
        self.steps.append(step)
        prop = self.inner.propose(step, params)
        if self.fail_every and len(self.steps) % self.fail_every == 0:
            prop = DraftProposal(TokenTree.chain(step.new_ids[-1], []), None, fallback="test")
        self.proposals.append(prop)
        return prop


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_engine_tells_the_drafter_what_was_accepted(temperature):
    """Every step after the first carries the accepted nodes of the previous proposal (a path
    of that tree whose tokens are the committed ones), or None after a fallback round; the
    features are one per committed token but the root. The first step comes after the fused
    first round: the prompt and the first token, with a feature for every prompt token."""
    target, drafter = _coral()
    rec = Recorder(drafter, fail_every=3)
    engine = Engine(TargetRunner(target, None), rec)
    params = SamplingParams(temperature=temperature, seed=3, max_new_tokens=24)
    prompt = [1, 5, 7, 2]
    out = [t for c in engine.generate(prompt, params) for t in c.token_ids]
    assert len(rec.steps) > 4
    committed = len(prompt)
    first = rec.steps[0]
    assert first.accepted is None and list(first.new_ids) == [*prompt, out[0]]
    assert first.features.shape[0] == committed
    for prev, step in zip(rec.proposals, rec.steps[1:], strict=False):
        assert step.features.shape[0] == len(step.new_ids)
        if prev.fallback is not None:
            assert step.accepted is None
            continue
        acc = step.accepted
        assert acc is not None and acc[0] == 0
        tree = prev.tree
        assert all(tree.parent_list[b] == a for a, b in itertools.pairwise(acc))
        assert [tree.token_list[i] for i in acc[1:]] == list(step.new_ids[:-1])
    assert any(s.accepted is None for s in rec.steps[1:])  # fallback rounds were exercised
    assert len(out) == 24


def test_draft_randomness_is_keyed_by_seed_and_length():
    """Two drafters in separate 'processes' (fresh objects) given the same sequence propose the
    same sampled tree; another committed length or seed gives another stream."""
    target, d1 = _coral()
    _, d2 = _coral()
    runner = TargetRunner(target, None)
    prompt = [1, 5, 7, 2, 9]
    feats = runner.prefill(prompt)
    params = SamplingParams(temperature=1.0, seed=11)
    a = d1.propose(DraftInput(prompt, feats), params)
    b = d2.propose(DraftInput(prompt, feats), params)
    assert a.tree.token_list == b.tree.token_list and torch.equal(a.rows.values, b.rows.values)
    g1, g2 = keyed_generator(11, DRAFT, 5), keyed_generator(11, VERIFY, 5)
    assert not torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))
    assert keyed_seed(11, DRAFT, 5) != keyed_seed(11, DRAFT, 6) != keyed_seed(12, DRAFT, 5)
    with pytest.raises(ValueError, match="seed"):
        keyed_seed(-1, DRAFT, 0)


def test_a_seedless_request_gets_a_reported_seed_that_replays_it():
    target, drafter = _coral()
    engine = Engine(TargetRunner(target, None), drafter, EngineConfig())
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    chunks = list(engine.generate([1, 5, 7], params))
    seed = chunks[-1].summary.seed
    again = list(
        engine.generate([1, 5, 7], SamplingParams(temperature=1.0, max_new_tokens=16, seed=seed))
    )
    assert [c.token_ids for c in chunks] == [c.token_ids for c in again]


class Every:
    """A `speculate` hook that speculates on rounds 1, 1 + k, 1 + 2k, ... (the rounds between
    decode plainly, the drafter not asked), and records what it was shown."""

    def __init__(self, k: int) -> None:
        self.k, self.round, self.seen = k, 0, []

    def __call__(self, last) -> bool:
        self.seen.append(last)
        self.round += 1
        return (self.round - 1) % self.k == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rounds_the_drafter_sat_out_reach_it_as_one_commit(temperature):
    """Plain rounds (speculation off under load) are not told to the drafter as they happen;
    its next step carries every token committed since it was last asked, with one feature per
    token, and no accepted path (it proposed none of them). Greedy output is unchanged; at T > 0
    a seed reproduces the same tokens for the same pattern."""
    target, drafter = _coral()
    runner = TargetRunner(target, None)
    params = SamplingParams(temperature=temperature, seed=3, max_new_tokens=30)
    prompt = [1, 5, 7, 2]

    def run(k: int):
        rec = Recorder(drafter)
        engine = Engine(runner, rec)
        engine.speculate = Every(k)
        chunks = list(engine.generate(prompt, params))
        return rec, engine.speculate, chunks

    rec, hook, chunks = run(3)
    out = [t for c in chunks for t in c.token_ids]
    assert len(out) == 30
    plain = [c.stats.plain for c in chunks]
    # round 1 is the fused first round (no draft, not a load-adaptive plain round); the hook
    # decides from round 2 on
    assert plain[:5] == [False, False, True, True, False]
    assert chunks[0].stats.tree_nodes == 1 and len(chunks[0].token_ids) == 1
    assert chunks[-1].summary.plain_rounds == sum(plain) > 0
    assert chunks[-1].summary.fallback_rounds == 0
    assert all(c.stats.tree_nodes == 1 and c.stats.accepted == 0 for c in chunks if c.stats.plain)
    # the hook saw each previous round's stats (from round 1's on)
    assert hook.seen == [c.stats for c in chunks[:-1]]
    # the drafter was asked on the speculative rounds only, and told every committed token once
    assert len(rec.steps) == len(chunks) - sum(plain) - 1
    told = [t for s in rec.steps for t in s.new_ids]
    assert told == (prompt + out)[: len(told)] and len(told) > len(prompt) + 10
    for step in rec.steps:
        assert step.features.shape[0] == len(step.new_ids) - (step is rec.steps[0])
    after_plain = [i for i, c in enumerate(chunks[:-1]) if c.stats.plain and not plain[i + 1]]
    assert after_plain
    for i in after_plain:  # the step of round i + 2 (1-based) follows plain rounds
        step = rec.steps[sum(not p for p in plain[1 : i + 1])]  # (round 1 asked nobody)
        assert step.accepted is None and len(step.new_ids) >= 2
    if temperature == 0:
        plain_out = [t for c in Engine(runner).generate(prompt, params) for t in c.token_ids]
        assert out == plain_out
    else:  # keyed coins: the same pattern and seed give the same tokens
        again = [t for c in run(3)[2] for t in c.token_ids]
        assert again == out
