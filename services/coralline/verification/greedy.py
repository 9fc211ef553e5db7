"""Greedy verification (temperature 0): accept the longest path whose every token equals the
target's argmax after its parent; the bonus is the argmax after the last accepted node.

Lossless for one-hot target rows (T = 0) under any tree; ignores draft rows and randomness.
Ties in a non-one-hot row go to the lowest token id (torch.argmax), like `warp(T=0)`.
"""

from __future__ import annotations

import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins
from coralline.tree import TokenTree
from coralline.verification.common import Inputs, VerifyResult


def verify_greedy(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [N, V]
    draft_probs: torch.Tensor | SparseRows | None,  # ignored
    rng: torch.Generator | Coins | None = None,  # unused: greedy is deterministic
    *,
    check: bool = True,
) -> VerifyResult:
    Inputs(tree, target_probs, None, needs_draft=False, check=check, name="greedy")
    node = 0
    while True:
        best = int(torch.argmax(target_probs[node]))
        nxt = tree.child(node, best)
        if nxt is None:
            return VerifyResult(tree.path(node), best)
        node = nxt
