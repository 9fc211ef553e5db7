"""Token-level speculative sampling on a chain (Leviathan et al. 2023; Chen et al. 2023).

Walk the chain: accept draft token x after node n with probability min(1, Mb(x|n) / Ms(x|n));
at the first rejection the bonus is drawn from norm(max(Mb(.|n) - Ms(.|n), 0)); when every
draft is accepted the bonus comes from Mb(.|last). Lossless when each draft token was sampled
from its parent's draft row. Chains only (a branching tree is a clear error).
"""

from __future__ import annotations

import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins, as_coins
from coralline.tree import TokenTree
from coralline.verification.common import Inputs, VerifyResult, residual


def verify_token_level(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [N, V]
    draft_probs: torch.Tensor | SparseRows | None,  # [N, V] or SparseRows
    rng: torch.Generator | Coins,
    *,
    check: bool = True,
) -> VerifyResult:
    inp = Inputs(
        tree,
        target_probs,
        draft_probs,
        needs_draft=True,
        chain_only=True,
        check=check,
        name="token_level",
    )
    coins = as_coins(rng)
    node = 0
    while tree.children[node]:
        child = tree.children[node][0]
        if coins.bernoulli(inp.target_at[child] / inp.draft_at[child]):
            node = child
            continue
        bonus = coins.categorical(residual(inp.target_row(node), inp.draft_row(node)))
        return VerifyResult(tree.path(node), bonus)
    return VerifyResult(tree.path(node), coins.categorical(target_probs[node]))
