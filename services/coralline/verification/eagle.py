"""EAGLE's stochastic verifier for deterministic (top-k) trees.

At node n with current target row p (originally Mb(.|n)), try the children in order: accept
child x with probability p(x) (the draft is deterministic, so q is treated as 1); on rejection
p(x) <- 0 and p is renormalised. If every child is rejected the bonus is drawn from what is
left of p. Lossless for ANY tree whose shape does not depend on the target's randomness (it is
RRSw with a one-hot draft per child), so draft rows are not needed.
"""

from __future__ import annotations

import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins, as_coins
from coralline.tree import TokenTree
from coralline.verification.common import Inputs, VerifyResult


def verify_eagle(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [N, V]
    draft_probs: torch.Tensor | SparseRows | None,  # ignored
    rng: torch.Generator | Coins,
    *,
    check: bool = True,
) -> VerifyResult:
    Inputs(tree, target_probs, None, needs_draft=False, check=check, name="eagle")
    coins = as_coins(rng)
    node = 0
    while True:
        row = target_probs[node]
        mass = 1.0  # mass of p not yet zeroed (p is normalised lazily: p(x) = row(x) / mass)
        rejected: list[int] = []
        for child in tree.children[node]:
            x = tree.token_list[child]
            px = 0.0 if x in rejected else float(row[x])
            if mass > 0.0 and coins.bernoulli(px / mass):
                node = child
                break
            rejected.append(x)
            mass -= px
        else:
            if rejected:
                row = row.double().clone()
                row[rejected] = 0.0
                if not float(row.sum()) > 0.0:  # all mass was on rejected tokens (rounding)
                    row = target_probs[node].double()
            return VerifyResult(tree.path(node), coins.categorical(row))
