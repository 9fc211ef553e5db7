"""The speculation cache (draft/pipeline.py): a tree pre-drafted for the expected outcome, before
the Commit, is exactly the tree the same pipelined drafter drafts after the Commit. Checked
round by round on the real target with the shipped CORAL head (greedy and sampled with a seed:
the trees, the draft rows and the output), with both hits and misses in the run; greedy output
equal to plain greedy decoding."""

from dataclasses import replace

import pytest
import torch

from coralline.draft.coral_drafter import CoralDrafter
from coralline.draft.pipeline import SpeculationCache
from coralline.draft.registry import make_drafter
from coralline.engine import Engine, generate_ids
from coralline.sampling import SamplingParams

PROMPT = "List five fruits and say one thing about each of them."


class _Recorder:
    """Records every proposal; with a cache, pre-drafts right after each one (as the drafter
    service does once the proposal is on the wire)."""

    def __init__(self, drafter, params) -> None:
        self.inner, self.params = drafter, params
        self.name, self.tree_kind = drafter.name, drafter.tree_kind
        self.chain_only = drafter.chain_only
        self.proposals = []

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, step, params):
        p = self.inner.propose(step, params)
        self.proposals.append(p)
        if isinstance(self.inner, SpeculationCache):
            self.inner.predraft(params)
        return p


def _pipelined(smollm2) -> CoralDrafter:
    base = make_drafter("coral", smollm2)
    return CoralDrafter(base.head, replace(base.config, pipeline=True), base.cost)


def _same(a, b) -> bool:
    if a.tree.token_list != b.tree.token_list or a.tree.parent_list != b.tree.parent_list:
        return False
    if (a.rows is None) != (b.rows is None):
        return False
    return a.rows is None or (
        torch.equal(a.rows.indices, b.rows.indices) and torch.equal(a.rows.values, b.rows.values)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    # (a seed whose run has both hits and misses: sampled bonus tokens are rarely predicted)
    [SamplingParams(max_new_tokens=64), SamplingParams(temperature=0.8, seed=5, max_new_tokens=64)],
    ids=["greedy", "T0.8"],
)
def test_pre_drafted_trees_are_the_trees_drafted_after_the_commit(smollm2, params):
    ids = smollm2.encode(PROMPT)
    plain = _Recorder(_pipelined(smollm2), params)
    cache = SpeculationCache(_pipelined(smollm2))
    cached = _Recorder(cache, params)
    out_plain = generate_ids(Engine(smollm2, plain), ids, params)
    out_cached = generate_ids(Engine(smollm2, cached), ids, params)
    assert out_cached == out_plain
    assert len(cached.proposals) == len(plain.proposals)
    for r, (a, b) in enumerate(zip(plain.proposals, cached.proposals, strict=True)):
        assert _same(a, b), f"round {r + 1} differs"
    st = cache.stats
    assert st.hits > 0 and st.misses > 0, st  # both branches ran
    assert st.hidden_ms > 0
    if params.greedy:
        assert out_plain == generate_ids(Engine(smollm2), ids, params)  # lossless


def test_the_cache_needs_a_pipelined_drafter(smollm2):
    with pytest.raises(ValueError, match="pipeline=True"):
        SpeculationCache(make_drafter("coral", smollm2))
