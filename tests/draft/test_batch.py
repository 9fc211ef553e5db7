"""Batched drafting (draft/batch.py): the batched head forward against CoralHead.forward, and
sessions drafting together against each drafting alone."""

import threading
import time

import pytest
import torch
from transformers import DynamicCache

from coralline.draft.batch import DraftBatchConfig, DraftBatcher, HeadCall, head_forward_many
from coralline.draft.coral import CoralHead, config_for_target
from coralline.draft.coral_drafter import CoralDrafter, CoralDrafterConfig
from coralline.engine import Engine
from coralline.sampling import SamplingParams
from coralline.target import TargetRunner

from ..tiny import tiny_llama

NEG = torch.finfo(torch.float64).min


def _head(dtype=torch.float64, vocab=24):
    target = tiny_llama(vocab, seed=3, scale=3.0).to(dtype)
    torch.manual_seed(3)
    head = CoralHead(config_for_target(target, "tiny", num_groups=4, active_groups=2))
    head.attach(target).init_groups()
    return target, head.to(dtype).eval()


def _cache_with(head, past: int):
    """A head cache holding `past` random entries (a session's committed context)."""
    cache = DynamicCache(config=head.config.llama_config())
    if past:
        d = head.config.hidden_size
        causal = torch.full((past, past), NEG, dtype=torch.float64).triu(1)[None, None]
        head(
            torch.randint(0, 24, (1, past)),
            torch.randn(1, past, d, dtype=torch.float64),
            torch.arange(past)[None],
            causal,
            cache,
        )
    return cache


def _tree_mask(past: int, parents: list[int]):  # [1, 1, n, past + n]: cached prefix + ancestors
    n = len(parents)
    mask = torch.full((n, past + n), NEG, dtype=torch.float64)
    mask[:, :past] = 0
    for i in range(n):
        a = i
        while a >= 0:
            mask[i, past + a] = 0
            a = parents[a]
    return mask[None, None]


def test_the_batched_head_forward_is_the_head_forward_call_by_call():
    """Four sessions at different cache lengths, one with one row (no mask), one causal
    chunk, two trees: every output row and every cache equals running each call alone."""
    _, head = _head()
    d = head.config.hidden_size
    torch.manual_seed(0)
    shapes = [(5, None), (0, "causal"), (9, [-1, 0, 0, 1]), (2, [-1, 0, 1, 1, 0])]
    calls, alone = [], []
    for past, pattern in shapes:
        n = 1 if pattern is None else (3 if pattern == "causal" else len(pattern))
        ids = torch.randint(0, 24, (n,))
        feats = torch.randn(n, d, dtype=torch.float64)
        pos = torch.arange(past, past + n)
        if pattern is None:
            mask = None
        elif pattern == "causal":
            mask = _tree_mask(past, [i - 1 for i in range(n)])
        else:
            mask = _tree_mask(past, pattern)
        torch.manual_seed(past)
        c1 = _cache_with(head, past)
        torch.manual_seed(past)
        c2 = _cache_with(head, past)
        calls.append(HeadCall(ids, feats, pos, mask, c1))
        alone.append(head(ids[None], feats[None], pos[None], mask, c2)[0])
        alone.append(c2)
    got = head_forward_many(head, calls)
    for i, call in enumerate(calls):
        ref, ref_cache = alone[2 * i], alone[2 * i + 1]
        assert got[i].shape == ref.shape
        torch.testing.assert_close(got[i], ref, rtol=1e-10, atol=1e-10)
        assert call.cache.get_seq_length() == ref_cache.get_seq_length()
        torch.testing.assert_close(call.cache.layers[0].keys, ref_cache.layers[0].keys)
        torch.testing.assert_close(call.cache.layers[0].values, ref_cache.layers[0].values)


class _Session:
    """What the drafter service does per proposal: draft inside the batcher's session block."""

    def __init__(self, drafter, batcher, name):
        self.inner, self.batcher, self.name_ = drafter, batcher, name
        self.name, self.tree_kind, self.chain_only = drafter.name, drafter.tree_kind, False
        self.proposals = []

    def reset(self):
        self.inner.reset()

    def propose(self, step, params):
        if self.batcher is None:
            prop = self.inner.propose(step, params)
        else:
            with self.batcher.drafting(self.name_):
                prop = self.inner.propose(step, params)
        rows = None if prop.rows is None else (prop.rows.indices.clone(), prop.rows.values.clone())
        self.proposals.append((prop.tree.token_list, prop.tree.parent_list, rows))
        return prop


PROMPTS = [[1, 5, 7, 2], [3, 3, 9, 14, 2, 8, 11, 6, 5, 1, 0, 7], [20, 4], [4, 9, 4, 9, 4, 9, 13]]


def _run(params, batcher, lookup):
    """Each prompt's generation with its own drafter (one thread each when batched)."""
    target, head = _head()
    cfg = CoralDrafterConfig(depth=3, max_nodes=10, draft_top_k=8, lookup=lookup)
    sessions = []
    for i in range(len(PROMPTS)):
        d = CoralDrafter(head, cfg)
        d.batcher = batcher
        sessions.append(_Session(d, batcher, f"s{i}"))
    outs = [None] * len(PROMPTS)

    def go(i):
        engine = Engine(TargetRunner(target, None), sessions[i])
        outs[i] = [t for c in engine.generate(PROMPTS[i], params) for t in c.token_ids]

    if batcher is None:
        for i in range(len(PROMPTS)):
            go(i)
    else:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return outs, [s.proposals for s in sessions]


@pytest.mark.parametrize(
    ("params", "lookup"),
    [
        (SamplingParams(max_new_tokens=20), True),
        (SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=20), False),
    ],
    ids=["greedy", "sampled"],
)
def test_sessions_drafting_together_propose_what_each_proposes_alone(params, lookup):
    """Four sessions (prompts of 2 to 12 tokens) generate at once with one batcher: every
    round's tree (and sampled rows) is the one the same session drafts alone, and so is the
    output; the batcher really batched (calls serving several sessions)."""
    alone_out, alone_props = _run(params, None, lookup)
    batcher = DraftBatcher(DraftBatchConfig(max_wait_ms=50))
    out, props = _run(params, batcher, lookup)
    assert out == alone_out
    for mine, ref in zip(props, alone_props, strict=True):
        assert len(mine) == len(ref) > 3
        for (tok, par, rows), (rtok, rpar, rrows) in zip(mine, ref, strict=True):
            assert (tok, par) == (rtok, rpar)
            if rows is not None:
                assert torch.equal(rows[0], rrows[0])
                torch.testing.assert_close(rows[1], rrows[1], rtol=1e-9, atol=1e-12)
    st = batcher.stats
    assert st.steps > st.batches  # several sessions per call on average
    assert max(st.sessions_hist) == len(PROMPTS)
    assert batcher.waiting == 0  # nothing left behind


def test_a_wave_waits_for_the_previous_waves_sessions_then_gives_up():
    """A session of the last wave that does not come back delays the next wave's first batch
    by at most max_wait_ms; a closed session (forget) is not waited for."""
    _, head = _head()
    batcher = DraftBatcher(DraftBatchConfig(max_wait_ms=100))
    d = head.config.hidden_size
    feats = torch.randn(2, d, dtype=torch.float64)
    both = threading.Barrier(2)

    def first_wave(name):  # a and b draft at the same time
        with batcher.drafting(name):
            both.wait()
            batcher.logits(head, True, feats)

    threads = [threading.Thread(target=first_wave, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batcher.stats.sessions_hist == {2: 1}  # one call for both
    t0 = time.perf_counter()
    with batcher.drafting("a"):  # wave 2: b never comes back
        batcher.logits(head, True, feats)
    waited = time.perf_counter() - t0
    assert waited >= 0.09
    batcher.forget("a")
    t0 = time.perf_counter()
    with batcher.drafting("c"):  # wave 3: a closed, nobody to wait for
        batcher.logits(head, True, feats)
    assert time.perf_counter() - t0 < 0.09


def test_a_session_slow_to_come_back_delays_the_others_by_at_most_max_wait_ms():
    """b is drafting but busy elsewhere for 0.5 s: a's step runs after max_wait_ms, not after
    b's next step."""
    _, head = _head()
    batcher = DraftBatcher(DraftBatchConfig(max_wait_ms=20))
    feats = torch.randn(2, head.config.hidden_size, dtype=torch.float64)
    inside = threading.Event()

    def slow_b():
        with batcher.drafting("b"):
            inside.set()
            time.sleep(0.5)
            batcher.logits(head, True, feats)

    t = threading.Thread(target=slow_b)
    t.start()
    inside.wait(5)
    t0 = time.perf_counter()
    with batcher.drafting("a"):
        batcher.logits(head, True, feats)
    assert time.perf_counter() - t0 < 0.3
    t.join()
    assert batcher.stats.sessions_hist == {1: 2}  # two calls, one session each


def test_a_failing_step_fails_only_its_callers_and_steps_need_a_session():
    _, head = _head()
    batcher = DraftBatcher()
    with pytest.raises(RuntimeError, match=r"inside DraftBatcher\.drafting"):
        batcher.logits(head, True, torch.zeros(1, head.config.hidden_size, dtype=torch.float64))
    with batcher.drafting("a"), pytest.raises(RuntimeError):  # wrong width
        batcher.logits(head, True, torch.zeros(1, 3, dtype=torch.float64))
    with batcher.drafting("a"):  # the batcher still works
        ids, logits = batcher.logits(
            head, True, torch.zeros(2, head.config.hidden_size, dtype=torch.float64)
        )
    assert logits.shape == ids.shape == (2, 2 * head.config.group_size)
    with pytest.raises(ValueError, match="max_wait_ms"):
        DraftBatchConfig(max_wait_ms=-1)
