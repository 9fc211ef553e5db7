"""Batched verification (batching/): several sessions over one batch scheduler, each session's
output equal to its single-session run on the reference runner (DynamicKV, one forward per
session); sessions with different prompt lengths join at different rounds, so batches mix trees
and prefill chunks; a session cancelled mid-batch leaves the others untouched; the scheduler's
bounds and errors. Tiny random Llama targets; the SmolLM2 runs are in test_batched_smollm2.py."""

import threading

import pytest
import torch

from coralline.batching import scheduler as scheduler_mod
from coralline.batching.forward import Item, Projections, ragged_forward, unsupported
from coralline.batching.pool import KVPool, PoolFull
from coralline.batching.scheduler import (
    BatchConfig,
    BatchScheduler,
    SessionGone,
    gather_wait,
    pooled,
)
from coralline.draft.model import ModelDrafter, ModelDrafterConfig
from coralline.engine import Engine, generate_ids
from coralline.sampling import SamplingParams
from coralline.target import TargetRunner
from coralline.tree import TokenTree

from ..tiny import perturbed, tiny_llama

VOCAB = 40


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(VOCAB, seed=31, layers=2, scale=2.0)
    return target, perturbed(target, 0.3, seed=32)


def _drafter(draft_model):
    return ModelDrafter(
        TargetRunner(draft_model, None), ModelDrafterConfig(branching=(3, 2), draft_top_k=6)
    )


def _specs():
    """(prompt, params, join after session 0 started this round) of 5 sessions."""
    g = torch.Generator().manual_seed(7)
    out = []
    for k, (length, join) in enumerate([(5, 0), (17, 2), (9, 3), (30, 3), (2, 6)]):
        prompt = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
        sampled = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=24, seed=100 + k)
        out.append((prompt, greedy if k % 2 == 0 else sampled, join))
    return out


def _reference(models, specs, drafted=True):
    target, draft = models
    return [
        generate_ids(Engine(TargetRunner(target, None), _drafter(draft) if drafted else None), p, s)
        for p, s, _ in specs
    ]


def _concurrent(models, specs, config, drafted=True, cancel=None):
    """Run every spec in its own thread over one scheduler; session k starts when session 0
    starts round `join`. cancel=(k, rounds): session k stops after that many rounds and frees
    its slot while the others run. -> (outputs, scheduler)."""
    target, draft = models
    root = pooled(TargetRunner(target, None), config)
    started = [threading.Event() for _ in range(64)]
    outs: list = [None] * len(specs)
    errors: list = []

    def run(k: int) -> None:
        prompt, params, join = specs[k]
        try:
            if k:
                assert started[join].wait(60), "session 0 never reached its round"
            runner = root.fork()
            engine = Engine(runner, _drafter(draft) if drafted else None)
            if k == 0:
                engine.on_round_start = lambda r: started[min(r, 63)].set()
            ids = []
            for n, chunk in enumerate(engine.generate(prompt, params), start=1):
                ids.extend(chunk.token_ids)
                if cancel is not None and cancel[0] == k and n == cancel[1]:
                    break
            runner.reset()  # frees the slot
            outs[k] = ids
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
        finally:
            if k == 0:
                for e in started:
                    e.set()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return outs, root.kv.scheduler


CONFIG = BatchConfig(slots=6, prefill_chunk=4, max_batch_tokens=64, max_wait_ms=100)


def test_concurrent_sessions_equal_their_single_session_runs(models):
    specs = _specs()
    want = _reference(models, specs)
    got, sched = _concurrent(models, specs, CONFIG)
    assert got == want
    st = sched.stats
    assert max(st.sessions_hist) >= 3, st.sessions_hist  # batches really held several sessions
    assert st.mixed > 0  # and prefill chunks rode along with other sessions' trees
    assert st.tokens / st.batches <= CONFIG.max_batch_tokens
    assert sched.pool.free_slots == CONFIG.slots  # every slot came back


def test_plain_decoding_batched_equals_plain_decoding(models):
    specs = _specs()
    assert _concurrent(models, specs, CONFIG, drafted=False)[0] == _reference(
        models, specs, drafted=False
    )


def test_a_session_cancelled_mid_generation_leaves_the_others_untouched(models):
    specs = _specs()
    want = _reference(models, specs)
    got, sched = _concurrent(models, specs, CONFIG, cancel=(2, 3))
    assert got[2] == want[2][: len(got[2])] and len(got[2]) < len(want[2])
    assert [g for k, g in enumerate(got) if k != 2] == [w for k, w in enumerate(want) if k != 2]
    assert sched.pool.free_slots == CONFIG.slots


def test_a_slot_freed_while_its_forward_waits(models):
    """B ran alone, so the next batch waits for B (up to 30 s); A's forward queued meanwhile is
    failed at once when A's slot is freed, and B's next forward runs and is right."""
    target, _ = models
    sched = BatchScheduler(target, BatchConfig(slots=2, max_wait_ms=30_000))
    ref = TargetRunner(target, None)
    b = TargetRunner(target, None, kv=_kv(sched))
    for r in (b, ref):
        r.prefill([1, 2, 3])
        r.tree_forward(TokenTree.chain(3, [6]))  # B's tree ran: the next batch expects B
        r.commit([0, 1])
    slot_a = sched.acquire()
    item = Item(slot_a, 0, torch.tensor([4, 5]), torch.arange(2), None, False)
    failed: list = []
    t = threading.Thread(target=lambda: _expect_gone(sched, item, failed))
    t.start()
    for _ in range(500):
        if sched.waiting:
            break
        threading.Event().wait(0.01)
    assert sched.waiting == 1 and not failed  # A's forward waits for B
    sched.release(slot_a)
    t.join(5)
    assert failed == ["gone"]
    tree = TokenTree.from_parents([6, 7, 8], [-1, 0, 0])
    got, want = b.tree_forward(tree), ref.tree_forward(tree)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert sched.pool.free_slots == 1


def _kv(sched):
    from coralline.batching.scheduler import PooledKV

    return PooledKV(sched)


def _expect_gone(sched, item, out):
    try:
        sched.run(item, tree=False)
        out.append("ran")
    except SessionGone:
        out.append("gone")


def test_ragged_forward_equals_separate_forwards(models):
    """Three sessions' trees, chains and a prefill chunk in one forward: each item's rows equal
    the reference runner's forward of that item alone."""
    target, _ = models
    pool = KVPool.for_model(target, slots=3, slot_tokens=64)
    refs = [TargetRunner(target, None) for _ in range(3)]
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 2], [9, 10, 11, 12]]
    items = []
    for slot, (r, p) in enumerate(zip(refs, prompts, strict=True)):
        pool.acquire()
        r.prefill(p[:-1])  # caches p[:-2]
        ids = torch.tensor(p[:-2], dtype=torch.int64)
        ragged_forward(target, pool, [Item(slot, 0, ids, torch.arange(len(ids)), None, False)])
        pool.lengths[slot] = len(ids)
    trees = [
        TokenTree.from_parents([5, 9, 10, 11], [-1, 0, 0, 1]),
        TokenTree.chain(7, [1, 2]),
        TokenTree.from_parents([11, 3, 4], [-1, 0, 1]),
    ]
    for slot, t in enumerate(trees):
        p = pool.lengths[slot]
        items.append(Item(slot, p, t.tokens, t.position_ids(p), t.ancestor_mask, True))
    got = ragged_forward(target, pool, items)
    for (hidden, logits), r, t in zip(got, refs, trees, strict=True):
        want = r.tree_forward(t)
        assert torch.allclose(logits, want.logits, atol=1e-5)
        assert torch.allclose(hidden.float(), want.features, atol=1e-5)
    # logits_from: the LM head over an item's last rows only (a prompt's first token)
    tree = trees[0]
    item = Item(
        0,
        pool.lengths[0],
        tree.tokens,
        tree.position_ids(pool.lengths[0]),
        tree.ancestor_mask,
        True,
        2,
    )
    ((hidden, logits),) = ragged_forward(target, pool, [item])
    assert logits.shape == (2, got[0][1].shape[1])
    assert torch.allclose(logits, got[0][1][2:], atol=1e-5)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="logits_from"):
            ragged_forward(
                target, pool, [Item(0, 0, tree.tokens, tree.position_ids(0), None, True, bad)]
            )


@pytest.mark.parametrize("kind", ["onednn", "transposed", "torch"])
def test_fused_projections_equal_the_models_own_modules(kind):
    """The scheduler's forward (q / k / v and gate / up fused: Projections) against the model's
    own modules, the reference: prefill chunks, then trees and a decode step in one batch, for
    every kind of linear layer; the same rows and the same keys / values written."""
    from coralline.cpu_linear import cpu_linears

    target = cpu_linears(tiny_llama(VOCAB, seed=33, layers=2, scale=2.0), kind)
    proj = Projections(target)
    assert len(proj.qkv) == len(proj.gate_up) == 2 and all(g is not None for g in proj.gate_up)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 12, 3)]
    trees = [
        TokenTree.from_parents([5, 9, 10, 11], [-1, 0, 0, 1]),
        TokenTree.chain(7, []),
        TokenTree.chain(11, [3, 4]),
    ]
    runs = []
    for fused in (None, proj):
        pool = KVPool.for_model(target, slots=3, slot_tokens=32)
        out = []
        for slot, ids in enumerate(prompts):
            pool.acquire()
            item = Item(slot, 0, ids, torch.arange(len(ids)), None, True)
            out += ragged_forward(target, pool, [item], fused)
            pool.lengths[slot] = len(ids)
        items = [
            Item(
                s, pool.lengths[s], t.tokens, t.position_ids(pool.lengths[s]), t.ancestor_mask, True
            )
            for s, t in enumerate(trees)
        ]
        out += ragged_forward(target, pool, items, fused)
        runs.append((out, pool))
    (ref, ref_pool), (got, got_pool) = runs
    for (h1, l1), (h2, l2) in zip(ref, got, strict=True):
        assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(h1, h2, atol=1e-5)
    for a, b in zip(ref_pool.keys + ref_pool.values, got_pool.keys + got_pool.values, strict=True):
        for slot, (ids, t) in enumerate(zip(prompts, trees, strict=True)):
            n = len(ids) + t.num_nodes  # the entries written (the rest is never-written memory)
            assert torch.allclose(a[slot, :, :n], b[slot, :, :n], atol=1e-5)


@pytest.mark.parametrize("slots", [(1, 4, 5), (2, 3, 4)])  # gathered, then a view
def test_shared_attention_equals_per_item_attention_over_a_garbage_pool(models, slots, monkeypatch):
    """Small items attend in one padded call; it equals attending one by one, even when every
    unwritten pool entry is NaN (entries past an item's length are masked and kept finite)."""
    from coralline.batching import forward

    target, _ = models
    pool = KVPool.for_model(target, slots=6, slot_tokens=64)
    for buf in (*pool.keys, *pool.values):
        buf.fill_(float("nan"))
    for _ in range(6):
        pool.acquire()
    g = torch.Generator().manual_seed(3)
    for slot, n in zip(slots, (7, 19, 2), strict=True):
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        ragged_forward(target, pool, [Item(slot, 0, ids, torch.arange(n), None, False)])
        pool.lengths[slot] = n
    trees = [
        TokenTree.from_parents([5, 9, 10, 11, 3], [-1, 0, 0, 1, 1]),
        TokenTree.chain(7, []),  # a decode step
        TokenTree.chain(11, [3, 4, 8]),
    ]
    items = [
        Item(s, pool.lengths[s], t.tokens, t.position_ids(pool.lengths[s]), t.ancestor_mask, True)
        for s, t in zip(slots, trees, strict=True)
    ]
    chunk = torch.randint(0, VOCAB, (9,), generator=g)  # a prompt chunk (attends alone)
    items.append(Item(0, 0, chunk, torch.arange(9), None, True))
    shared = ragged_forward(target, pool, items)
    monkeypatch.setattr(forward, "SHARED_ATTENTION_MAX", 0)  # every item alone: the reference
    alone = ragged_forward(target, pool, items)
    for (h1, l1), (h2, l2) in zip(shared, alone, strict=True):
        assert torch.isfinite(l1).all() and torch.isfinite(h1).all()
        assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(h1, h2, atol=1e-5)


def test_pool_cover_zeroes_only_what_was_never_written():
    pool = KVPool(1, 1, 2, slots=1, slot_tokens=16)
    pool.keys[0].fill_(float("nan"))
    pool.keys[0][0, :, :5] = 1.0  # written
    pool.cover(0, written=5, needed=8, ahead=2)
    assert pool.finite[0] == 10
    assert (pool.keys[0][0, :, :5] == 1).all() and (pool.keys[0][0, :, 5:10] == 0).all()
    assert pool.keys[0][0, :, 10:].isnan().all()  # beyond what was asked: untouched
    pool.cover(0, written=3, needed=9)  # already finite: nothing moves
    assert pool.finite[0] == 10 and (pool.keys[0][0, :, :5] == 1).all()


def test_pool_keep_moves_only_what_moves_and_bounds():
    pool = KVPool(1, 1, 2, slots=2, slot_tokens=8)
    slot = pool.acquire()
    vals = torch.arange(6, dtype=torch.float32)[None, :, None].expand(1, 6, 2)  # [1, 6, 2]
    pool.write_many(0, torch.full((6,), slot), torch.arange(6), vals, vals)
    pool.keep(slot, 2, [0, 2, 3])  # entries 2, 4, 5 at 2, 3, 4
    assert pool.lengths[slot] == 5
    assert pool.view(0, slot, 5)[0][0, :, 0].tolist() == [0, 1, 2, 4, 5]
    other = pool.acquire()
    with pytest.raises(PoolFull, match="all 2 KV slots"):
        pool.acquire()
    pool.release(other)
    with pytest.raises(ValueError, match="not held"):
        pool.release(other)
    with pytest.raises(ValueError, match=">= 1"):
        KVPool(1, 1, 2, slots=0, slot_tokens=8)
    assert pool.bytes_per_token == 2 * 1 * 1 * 2 * 4


def test_scheduler_errors(models):
    target, _ = models
    with pytest.raises(ValueError, match="slots, max_batch_tokens"):
        BatchConfig(slots=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        BatchConfig(max_wait_ms=-1)
    with pytest.raises(ValueError, match="gap_factor"):
        BatchConfig(gap_factor=0.5)
    sched = BatchScheduler(target, BatchConfig(slots=1, max_batch_tokens=4))
    runner = TargetRunner(target, None, kv=_kv(sched))
    runner.prefill([1, 2, 3, 4, 5, 6, 7])  # chunks: a prompt is not bounded by a batch
    with pytest.raises(ValueError, match="exceeds max_batch_tokens"):
        runner.tree_forward(TokenTree.chain(7, [1, 2, 3, 4]))
    other = TargetRunner(target, None, kv=_kv(sched))
    with pytest.raises(PoolFull, match="KV slots"):
        other.prefill([1, 2, 3])
    runner.reset()
    other.prefill([1, 2, 3])  # the slot came back
    sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        other.tree_forward(TokenTree.chain(3, []))


def test_unsupported_models_are_named():
    from torch import nn

    class Plain(nn.Module):
        pass

    assert "not a Llama-shaped" in unsupported(Plain())
    with pytest.raises(ValueError, match="cannot run this model"):
        BatchScheduler(Plain())


def test_gather_wait_follows_the_missing_sessions_gaps_up_to_a_forward():
    assert gather_wait(0.02, [], 0.09, 1.5) == 0.02  # no gap known: the floor
    assert gather_wait(0.02, [0.004, 0.006], 0.09, 1.5) == 0.02  # plain decoding: the floor
    assert gather_wait(0.02, [0.01, 0.04], 0.09, 1.5) == pytest.approx(0.06)  # the slowest
    assert gather_wait(0.02, [0.08], 0.09, 1.5) == pytest.approx(0.09)  # never past a forward
    assert gather_wait(0.05, [0.02], 0.03, 1.5) == 0.05  # the floor over a short forward
    assert gather_wait(0.02, [0.2], 0.09, 1.5) == 0.02  # slower than a forward: not waited for
    assert gather_wait(0.02, [0.2, 0.04], 0.09, 1.5) == pytest.approx(0.06)  # the others are


def _two_sessions_one_slow(models, monkeypatch, adaptive: bool, rounds: int = 14):
    """A resubmits at once, B 40 ms after each of its forwards (a drafter round trip), over a
    device whose forward takes 80 ms; -> the scheduler's batch sizes."""
    target, _ = models
    real = scheduler_mod.ragged_forward

    def slow_device(*args, **kw):
        threading.Event().wait(0.08)
        return real(*args, **kw)

    monkeypatch.setattr(scheduler_mod, "ragged_forward", slow_device)
    sched = BatchScheduler(target, BatchConfig(slots=2, max_wait_ms=5, adaptive_wait=adaptive))
    runners = [TargetRunner(target, None, kv=_kv(sched)) for _ in range(2)]
    for r in runners:
        r.prefill([1, 2, 3])
    prefills = dict(sched.stats.sessions_hist)
    start = threading.Barrier(2)

    def session(runner, gap_s):
        start.wait()
        for _ in range(rounds):
            runner.tree_forward(TokenTree.chain(3, [5]))
            runner.commit([0, 1])
            threading.Event().wait(gap_s)

    gaps = (0.0, 0.04)
    threads = [threading.Thread(target=session, args=a) for a in zip(runners, gaps, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)  # every round ran
    sched.close()
    assert sched.stats.items - sum(k * n for k, n in prefills.items()) == 2 * rounds  # trees
    return {k: n - prefills.get(k, 0) for k, n in sched.stats.sessions_hist.items()}


def test_sessions_slower_than_the_floor_still_share_forwards(models, monkeypatch):
    """B misses every batch by its 40 ms round trip. Waiting only max_wait_ms (5 ms), A runs
    alone in every other batch; waiting for B's usual gap (60 ms < one 80 ms forward), A and B
    share their forwards after the first gap is seen."""
    fixed = _two_sessions_one_slow(models, monkeypatch, adaptive=False)
    assert fixed.get(2, 0) <= 9 and fixed.get(1, 0) >= 10  # A alone, B's last rounds alone
    adaptive = _two_sessions_one_slow(models, monkeypatch, adaptive=True)
    assert adaptive.get(2, 0) >= 11 and adaptive.get(1, 0) <= 6  # alone: before a gap is seen
