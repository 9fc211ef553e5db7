"""The CPU attention kernel (batching/cpu_attention.cpp): it computes what masked SDPA over each
item's own entries computes, never reads past an item's length, refuses bad input with a clear
error, and the ragged forward that uses it equals the per-item reference path. `make install`
builds it; these tests fail, not skip, where it did not build."""

import pytest
import torch
import torch.nn.functional as F

from coralline.batching import cpu_attention
from coralline.batching.forward import Item, ragged_forward
from coralline.batching.pool import KVPool
from coralline.batching.scheduler import BatchConfig, BatchScheduler
from coralline.tree import TokenTree

from ..tiny import tiny_llama


def _kernel():
    module = cpu_attention.kernel()
    assert module is not None, f"the CPU attention kernel did not build: {cpu_attention.error()}"
    return module


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that grows by one at each call of the kernel."""
    kern = _kernel()
    calls = []
    real = kern.pooled_attention
    monkeypatch.setattr(kern, "pooled_attention", lambda *a: calls.append(1) or real(*a))
    return calls


def _reference(q, keys, values, slots, lens, mask, scale):
    """Item by item: SDPA over the slot's first lens[b] entries with that item's mask."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        s, n = int(slots[b]), int(lens[b])
        k, v = keys[s, :, :n][None], values[s, :, :n][None]  # [1, kvH, n, hd]
        m = mask[b, :, :n][None, None]  # [1, 1, rows, n]
        out[b] = F.scaled_dot_product_attention(
            q[b : b + 1], k, v, attn_mask=m, scale=scale, enable_gqa=True
        )[0]
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "rows"), [(9, 3, 1), (4, 2, 3), (2, 2, 4)])
def test_the_kernel_computes_what_masked_sdpa_computes_and_never_reads_past_a_length(
    heads, kv_heads, rows
):
    kern = _kernel()
    g = torch.Generator().manual_seed(heads * 10 + rows)
    slots_n, S, hd = 6, 40, 16
    keys = torch.full((slots_n, kv_heads, S, hd), float("nan"))  # unwritten entries: NaN
    values = torch.full((slots_n, kv_heads, S, hd), float("nan"))
    slots = torch.tensor([4, 1, 5, 2])  # not consecutive, not in order
    lens = torch.tensor([rows, 17, 33, 9])
    for s, n in zip(slots.tolist(), lens.tolist(), strict=True):
        keys[s, :, :n] = torch.randn(kv_heads, n, hd, generator=g)
        values[s, :, :n] = torch.randn(kv_heads, n, hd, generator=g)
    lmax = int(lens.max())
    mask = torch.zeros(4, rows, lmax, dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        mask[b, :, : n - rows] = True  # the cached prefix
        tail = torch.rand(rows, rows, generator=g) < 0.5  # a random ancestor pattern
        mask[b, :, n - rows : n] = tail.tril() | torch.eye(rows, dtype=torch.bool)
    q = torch.randn(4, heads, rows, hd, generator=g)
    got = kern.pooled_attention(q, keys, values, slots, lens, mask, 0.25)
    want = _reference(q, keys, values, slots, lens, mask, 0.25)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_row_that_sees_no_key_gets_zeros():
    kern = _kernel()
    keys = torch.randn(2, 1, 8, 4)
    q = torch.randn(1, 1, 2, 4)
    mask = torch.zeros(1, 2, 8, dtype=torch.bool)
    mask[0, 0, :3] = True
    out = kern.pooled_attention(q, keys, keys, torch.tensor([1]), torch.tensor([3]), mask, 1.0)
    assert torch.equal(out[0, 0, 1], torch.zeros(4)) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": torch.zeros(1, 2, 1, 4, dtype=torch.float64)}, "float32 only"),
        ({"slots": torch.tensor([7])}, "slot out of range"),
        ({"lens": torch.tensor([9])}, "length out of range"),
        ({"q": torch.zeros(1, 3, 1, 4)}, "head counts"),
        ({"mask": torch.ones(1, 2, 8, dtype=torch.bool)}, "do not match"),
        ({"slots": torch.tensor([0], dtype=torch.int32)}, "int64"),
    ],
)
def test_bad_input_gets_a_clear_error(change, message):
    kern = _kernel()
    args = {
        "q": torch.zeros(1, 2, 1, 4),
        "keys": torch.zeros(2, 2, 8, 4),
        "values": torch.zeros(2, 2, 8, 4),
        "slots": torch.tensor([1]),
        "lens": torch.tensor([3]),
        "mask": torch.ones(1, 1, 8, dtype=torch.bool),
    }
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        kern.pooled_attention(*args.values(), 1.0)


def test_the_ragged_forward_on_the_kernel_equals_the_per_item_reference(monkeypatch, kernel_calls):
    """Decode steps and trees of up to KERNEL_MAX_NODES nodes, and two larger trees, over a
    NaN-filled pool: the small ones share the kernel (counted), the larger ones an SDPA call,
    and every row equals attending item by item."""
    from coralline.batching import forward

    calls = kernel_calls
    target = tiny_llama(40, seed=5, layers=2)
    pool = KVPool.for_model(target, slots=5, slot_tokens=64)
    for buf in (*pool.keys, *pool.values):
        buf.fill_(float("nan"))
    g = torch.Generator().manual_seed(9)
    slots, prompts = [3, 0, 4, 1, 2], (11, 2, 23, 5, 9)
    for slot, n in zip(slots, prompts, strict=True):
        pool.acquire()
        ids = torch.randint(0, 40, (n,), generator=g)
        ragged_forward(target, pool, [Item(slot, 0, ids, torch.arange(n), None, False)])
        pool.lengths[slot] = n
    trees = [
        TokenTree.chain(7, []),  # a decode step
        TokenTree.from_parents([5, 9, 10, 11], [-1, 0, 0, 1]),  # 4 nodes: the kernel's largest
        TokenTree.chain(11, [3]),
        TokenTree.from_parents([1, 2, 3, 4, 5, 6], [-1, 0, 0, 1, 1, 2]),  # larger: SDPA ...
        TokenTree.chain(8, [9, 10, 11, 12, 13, 14]),  # ... sharing a call of their own
    ]
    items = [
        Item(s, pool.lengths[s], t.tokens, t.position_ids(pool.lengths[s]), t.ancestor_mask, True)
        for s, t in zip(slots, trees, strict=True)
    ]
    sdpa = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: sdpa.append(1) or real_sdpa(*a, **k)
    )
    got = ragged_forward(target, pool, items, cpu_kernel=True)
    layers = target.config.num_hidden_layers
    assert len(calls) == layers  # one kernel call per layer for the 3 small items
    assert len(sdpa) == layers  # one SDPA call per layer for the 2 larger trees
    monkeypatch.setattr(F, "scaled_dot_product_attention", real_sdpa)
    monkeypatch.setattr(forward, "SHARED_ATTENTION_MAX", 0)  # every item alone: the reference
    want = ragged_forward(target, pool, items)
    for (h1, l1), (h2, l2) in zip(got, want, strict=True):
        assert torch.isfinite(l1).all() and torch.isfinite(h1).all()
        assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(h1, h2, atol=1e-5)


def test_larger_trees_and_a_switched_off_kernel_keep_sdpa(kernel_calls):
    calls = kernel_calls
    target = tiny_llama(40, seed=5, layers=2)
    pool = KVPool.for_model(target, slots=3, slot_tokens=64)
    n = cpu_attention.KERNEL_MAX_NODES + 1
    items = []
    for slot in range(2):
        pool.acquire()
        items.append(Item(slot, 0, torch.arange(n), torch.arange(n), None, True))
    ragged_forward(target, pool, items, cpu_kernel=True)  # 5-token items: SDPA
    assert calls == []
    assert cpu_attention.usable(torch.zeros(1), torch.zeros(2))
    assert not cpu_attention.usable(torch.zeros(1), torch.zeros(2, dtype=torch.float64))
    on = BatchScheduler(target, BatchConfig(slots=2))
    off = BatchScheduler(target, BatchConfig(slots=2, cpu_attention=False))
    assert on.cpu_kernel and not off.cpu_kernel


def test_the_environment_switches_the_kernel_off(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_state", {})
    monkeypatch.setenv("CORALLINE_CPU_ATTENTION", "0")
    assert cpu_attention.kernel() is None
    assert cpu_attention.error() == "CORALLINE_CPU_ATTENTION=0"
    assert not cpu_attention.usable(torch.zeros(1))
