"""Fast paths against their readable twins, on realistic sizes (V = 2048, 40-node trees).

- Traversal with SparseRows (O(K) residual masses) == traversal with the same rows dense, call
  for call with the same seed (same coins, same decisions, same bonus).
- Traversal on chains == block verification in law: mean acceptance agrees on long chains.
- check=False returns exactly what check=True returns.
"""

import torch

from coralline.rows import SparseRows
from coralline.sampling import make_generator, sample_without_replacement, warp
from coralline.tree import TokenTree
from coralline.verification import VERIFIERS


def _setup(seed, n=40, vocab=2048, top_k=16, branching=(3, 2, 2, 1), noise=1.0):
    g = make_generator(seed)
    logits = torch.randn(n, vocab, generator=g) * 3.0
    target = warp(logits, 1.0)
    draft = SparseRows.from_dense(
        warp(logits + noise * torch.randn(n, vocab, generator=g), 1.0, top_k=top_k)
    )
    dense = draft.to_dense()
    tokens, parents, frontier = [0], [-1], [(0, 0)]
    while frontier and len(tokens) < n:
        node, depth = frontier.pop(0)
        k = min(branching[min(depth, len(branching) - 1)], n - len(tokens))
        for tok in sample_without_replacement(dense[node], k, g).tolist():
            tokens.append(tok)
            parents.append(node)
            frontier.append((len(tokens) - 1, depth + 1))
    return TokenTree.from_parents(tokens, parents), target, draft, dense


def test_sparse_traversal_matches_dense_call_for_call():
    verify = VERIFIERS["traversal"].fn
    accepted_lengths = set()
    for seed in range(30):
        tree, target, sparse, dense = _setup(seed)
        for run in range(5):
            a = verify(tree, target, sparse, make_generator(run))
            b = verify(tree, target, dense, make_generator(run))
            assert a == b, (seed, run)
            accepted_lengths.add(a.num_accepted)
    assert len(accepted_lengths) > 2  # deep and shallow acceptances both exercised


def test_unchecked_equals_checked():
    for seed in range(10):
        for branching in ((3, 2, 2, 1), (1,)):
            tree, target, sparse, _ = _setup(seed, branching=branching)
            for name, spec in VERIFIERS.items():
                if spec.chain_only and not tree.is_chain:
                    continue
                a = spec.fn(tree, target, sparse, make_generator(seed), check=True)
                b = spec.fn(tree, target, sparse, make_generator(seed), check=False)
                assert a == b, name


def test_block_and_traversal_agree_on_long_chains_in_acceptance_rate():
    """Same law on chains of 40 nodes with V = 2048: mean accepted length over 400 seeds agrees
    within Monte Carlo error (the exact equality is proven by enumeration on small V)."""
    block, trav = VERIFIERS["block"].fn, VERIFIERS["traversal"].fn
    tree, target, sparse, _ = _setup(3, branching=(1,), noise=0.2)
    a = [block(tree, target, sparse, make_generator(s)).num_accepted for s in range(400)]
    b = [trav(tree, target, sparse, make_generator(10_000 + s)).num_accepted for s in range(400)]
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    assert mean_a > 1.0  # deep acceptances happen: the comparison is not vacuous
    pooled = torch.tensor(a + b, dtype=torch.float64).std().item()
    assert abs(mean_a - mean_b) < 5 * pooled * (2 / 400) ** 0.5


def test_greedy_on_raw_logits_equals_greedy_on_the_warped_rows():
    """The engine's T = 0 fast path (verify_greedy_logits on the raw logits) against the
    reference (verify_greedy on warp(logits, 0)): the same path and bonus on trees whose nodes
    follow the argmax to various depths, with ties (small integer logits: the first maximum
    wins in both) and a row of NaN."""
    import pytest

    from coralline.verification.greedy import verify_greedy, verify_greedy_logits

    depths = set()
    for seed in range(60):
        g = make_generator(seed)
        n, vocab = 24, 64
        if seed % 3 == 0:  # many ties
            logits = torch.randint(0, 3, (n, vocab), generator=g).float()
        else:
            logits = torch.randn(n, vocab, generator=g) * 2.0
        if seed % 10 == 5:
            logits[int(torch.randint(0, n, (1,), generator=g))] = float("nan")
        tokens, parents = [int(torch.randint(0, vocab, (1,), generator=g))], [-1]
        while len(tokens) < n:  # a child of a random node: its argmax half of the time
            p = int(torch.randint(0, len(tokens), (1,), generator=g))
            if float(torch.rand(1, generator=g)) < 0.5:
                tok = int(logits[p].argmax())
            else:
                tok = int(torch.randint(0, vocab, (1,), generator=g))
            if tok in [tokens[i] for i in range(len(tokens)) if parents[i] == p]:
                continue
            tokens.append(tok)
            parents.append(p)
        tree = TokenTree.from_parents(tokens, parents)
        want = verify_greedy(tree, warp(logits, 0.0), None)
        got = verify_greedy_logits(tree, logits)
        assert got == want, seed
        assert verify_greedy_logits(tree, logits, check=False) == want
        depths.add(want.num_accepted)
    assert len(depths) >= 3  # shallow and deep acceptances both exercised

    tree = TokenTree.chain(3, [5])
    with pytest.raises(ValueError, match="rows but the tree has"):
        verify_greedy_logits(tree, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_greedy_logits(TokenTree.chain(3, [9]), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="TokenTree"):
        verify_greedy_logits([3, 5], torch.zeros(2, 8))


def test_row_argmax_is_torch_argmax_ties_nan_and_infinities_included():
    """verification.greedy.row_argmax (NumPy's argmax on the CPU) returns what torch.argmax
    returns: the first maximum, the first NaN over any number, for float32 and float64 rows,
    strided views and inference tensors included; other dtypes go to torch itself."""
    from coralline.verification.greedy import row_argmax

    g = make_generator(11)
    rows = [torch.randn(49152, generator=g) for _ in range(20)]
    tie = torch.zeros(50)
    tie[[7, 9, 30]] = 2.0  # ties: the first
    nan = torch.randn(50, generator=g)
    nan[[12, 40]] = float("nan")  # NaN wins, the first one
    inf = torch.full((50,), float("-inf"))
    pinf = torch.randn(50, generator=g)
    pinf[[5, 6]] = float("inf")
    zeros = torch.tensor([-0.0, 0.0, -0.0])
    with torch.inference_mode():
        inference_row = torch.randn(300, generator=g)
    strided = torch.randn(64, 40, generator=g)[:, 3]  # a column: stride 40
    cases = [*rows, tie, nan, inf, pinf, zeros, inference_row, strided]
    cases += [c.double() for c in cases] + [torch.randn(99, generator=g).bfloat16(), tie.half()]
    for row in cases:
        assert row_argmax(row) == int(torch.argmax(row)), row
