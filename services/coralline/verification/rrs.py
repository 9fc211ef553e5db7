"""Recursive rejection sampling over a tree, top-down and token-level (SpecInfer).

At node n, try its children in order. A child with token x is accepted with probability
min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)) and
  - RRS (children drawn i.i.d. from Ms): q stays as it is;
  - RRSw (children drawn without replacement): q(x) <- 0 and q is renormalised.
If every child is rejected the bonus is drawn from the final p. An accepted child becomes the
new n with its own original rows. Lossless when the children were drawn as the variant assumes.
"""

from __future__ import annotations

import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins, as_coins
from coralline.tree import TokenTree
from coralline.verification.common import Inputs, VerifyResult, residual


def _rrs(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [N, V]
    draft_probs: torch.Tensor | SparseRows | None,
    rng: torch.Generator | Coins,
    *,
    without_replacement: bool,
    check: bool,
) -> VerifyResult:
    name = "rrsw" if without_replacement else "rrs"
    inp = Inputs(
        tree,
        target_probs,
        draft_probs,
        needs_draft=True,
        swor=without_replacement,
        check=check,
        name=name,
    )
    coins = as_coins(rng)
    node = 0
    while True:
        p = q = None  # current rows at `node`, materialised at the first rejection only
        for child in tree.children[node]:
            x = tree.token_list[child]
            if p is None:
                ratio = inp.target_at[child] / inp.draft_at[child]
            else:
                qx = float(q[x])
                ratio = float(p[x]) / qx if qx > 0.0 else 0.0
            if coins.bernoulli(ratio):
                node = child
                break
            if p is None:
                p, q = inp.target_row(node), inp.draft_row(node)
            p = residual(p, q)
            if without_replacement:
                q = q.clone()
                q[x] = 0.0
                total = float(q.sum())
                if total > 0.0:
                    q /= total
        else:
            row = inp.target_row(node) if p is None else p
            return VerifyResult(tree.path(node), coins.categorical(row))


def verify_rrs(tree, target_probs, draft_probs, rng, *, check: bool = True) -> VerifyResult:
    """SpecInfer RRS: children sampled i.i.d. from the draft row."""
    return _rrs(tree, target_probs, draft_probs, rng, without_replacement=False, check=check)


def verify_rrsw(tree, target_probs, draft_probs, rng, *, check: bool = True) -> VerifyResult:
    """RRS without replacement: children sampled as a SWOR sequence from the draft row."""
    return _rrs(tree, target_probs, draft_probs, rng, without_replacement=True, check=check)
