"""Greedy verification (temperature 0): accept the longest path whose every token equals the
target's argmax after its parent; the bonus is the argmax after the last accepted node.

Lossless for one-hot target rows (T = 0) under any tree; ignores draft rows and randomness.
Ties in a non-one-hot row go to the lowest token id (torch.argmax, or `row_argmax`: the same
semantics, faster on the CPU), like `warp(T=0)`.

`verify_greedy_logits` is the engine's fast path: the same walk on the raw logits (their argmax
is the one-hot row's), skipping the warp and the row checks; tested against verify_greedy.
"""

from __future__ import annotations

import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins
from coralline.tree import TokenTree
from coralline.verification.common import Inputs, VerifyResult, _check_rows


def row_argmax(row: torch.Tensor) -> int:
    """`int(torch.argmax(row))` of a 1-D row: the first maximum, and a NaN counts as the
    maximum (the first NaN wins). On the CPU in float32 / float64 it runs NumPy's SIMD argmax,
    which has those same semantics: ~6 us for SmolLM2's 49152 logits on one thread where
    torch's took ~80-100 us (AMD EPYC here, 2026-12-03), and under load the sessions pay it
    one after another between two batched forwards. Elsewhere: torch.argmax."""
    if row.device.type == "cpu" and row.dtype in (torch.float32, torch.float64):
        return int(row.detach().numpy().argmax())
    return int(torch.argmax(row))


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
        best = row_argmax(target_probs[node])
        nxt = tree.child(node, best)
        if nxt is None:
            return VerifyResult(tree.path(node), best)
        node = nxt


def verify_greedy_logits(
    tree: TokenTree,
    logits: torch.Tensor,  # [N, V] the target's raw logits after each node
    *,
    check: bool = True,
) -> VerifyResult:
    """`verify_greedy(tree, warp(logits, temperature=0))` without building one-hot rows.

    The argmax of a raw row is the argmax of its warped one-hot row (torch.argmax, the first
    maximum, in both), so the result is the same, NaN rows included. What it skips, a [N, V]
    one-hot, the row checks and a keyed generator, costs ~0.2-0.3 ms a round on one CPU
    thread for SmolLM2's 49152 tokens, and under load the sessions pay it one after another
    between two batched forwards. `check` validates the shapes and the tree's tokens."""
    if check:
        if not isinstance(tree, TokenTree):
            raise ValueError(f"tree must be a TokenTree, got {type(tree)}")
        vocab = _check_rows("logits", logits, tree.num_nodes)
        if int(tree.tokens.max()) >= vocab:
            raise ValueError(
                f"tree token {int(tree.tokens.max())} is outside the vocabulary [0, {vocab})"
            )
    node = 0
    while True:
        best = row_argmax(logits[node])
        nxt = tree.child(node, best)
        if nxt is None:
            return VerifyResult(tree.path(node), best)
        node = nxt
