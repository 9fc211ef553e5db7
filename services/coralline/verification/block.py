"""Block verification on a chain (Sun, Mendlovic, Leviathan, Aharoni, Beirami, Ro, Suresh 2024).

Draft chain x_1..x_g after the root; rows Mb(.|c_i), Ms(.|c_i) at chain node c_i (c_0 = root).
  p_0 = 1,  p_i = min(1, p_{i-1} Mb(x_i|c_{i-1}) / Ms(x_i|c_{i-1}))
  h_g = p_g,  h_i = S_i / (S_i + 1 - p_i)  with  S_i = sum_v max(0, p_i Mb(v|c_i) - Ms(v|c_i))
  tau = the largest i with eta_i <= h_i (independent uniforms; h_0 = 1 so tau >= 0)
  bonus ~ Mb(.|c_g) if tau = g, else norm(max(p_tau Mb(.|c_tau) - Ms(.|c_tau), 0))
The optimal verifier for a single draft; Traversal Verification on a chain is the same law,
computed differently (this file is the independent reference for that invariant). Scanning
i = g, g-1, ... and stopping at the first success draws tau with the same law while computing
only the S_i it needs.
"""

from __future__ import annotations

import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins, as_coins
from coralline.tree import TokenTree
from coralline.verification.common import Inputs, VerifyResult


def verify_block(
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
        name="block",
    )
    coins = as_coins(rng)
    chain = tree.path(tree.leaves[0])  # c_0 .. c_g
    g = len(chain) - 1
    p = [1.0] * (g + 1)
    for i in range(1, g + 1):
        c = chain[i]
        p[i] = min(1.0, p[i - 1] * inp.target_at[c] / inp.draft_at[c])
    if coins.bernoulli(p[g]):
        return VerifyResult(chain, coins.categorical(target_probs[chain[g]]))
    for i in range(g - 1, -1, -1):
        s = inp.residual_mass(chain[i], p[i])
        h = 1.0 if i == 0 else (s / (s + 1.0 - p[i]) if s > 0.0 else 0.0)
        if coins.bernoulli(h):
            row = inp.residual_row(chain[i], p[i])
            return VerifyResult(chain[: i + 1], coins.categorical(row))
    raise AssertionError("unreachable: h_0 = 1 always accepts the root")
