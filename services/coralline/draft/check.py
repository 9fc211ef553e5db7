"""Validation of a proposal that comes from outside the process (the drafter service).

The in-process engine trusts its own drafters; a verifier must not trust the network. A
proposal that fails any check here is not used: the round verifies the root alone (plain
decoding, lossless) and the reason is counted. Checks: the root is the expected token, the
tree fits the node limit and the vocabulary, a chain-only drafter sent a chain, siblings are
distinct where children are drawn without replacement, and draft rows (required for sampled
trees at T > 0) have one row per node over the target's vocabulary, finite non-negative
values summing to 1, no token listed twice, and positive probability for every drafted token
under its parent's row (else the tree was not drawn from these rows).

Knows nothing about gRPC or models.
"""

from __future__ import annotations

from coralline.draft.base import DraftProposal
from coralline.rows import SparseRows
from coralline.verification.common import ROW_SUM_TOL


class BadProposal(ValueError):
    """A proposal that must not be verified (the message says why)."""


def check_proposal(
    proposal: DraftProposal,
    *,
    root: int,  # the token the tree must start from (the last committed token)
    vocab_size: int,
    max_nodes: int,  # root included
    tree_kind: str,  # the drafter's declared kind (draft/base.py)
    chain_only: bool,
    needs_rows: bool,  # sampled trees at T > 0: the verifier reads the draft rows
) -> None:
    """Raise BadProposal when the proposal cannot be verified losslessly as it is."""
    tree, rows = proposal.tree, proposal.rows
    n = tree.num_nodes
    if tree.token_list[0] != root:
        raise BadProposal(f"the tree's root is token {tree.token_list[0]}, expected {root}")
    if n > max_nodes:
        raise BadProposal(f"the tree has {n} nodes, over the limit of {max_nodes}")
    if max(tree.token_list) >= vocab_size:
        raise BadProposal(f"a tree token is outside the vocabulary [0, {vocab_size})")
    if chain_only and not tree.is_chain:
        raise BadProposal("a chain-only drafter sent a branching tree")
    if tree_kind in ("sampled_swor", "deterministic"):
        for node, kids in enumerate(tree.children):
            toks = [tree.token_list[c] for c in kids]
            if len(set(toks)) != len(toks):
                raise BadProposal(f"node {node} has two children with the same token")
    if rows is None:
        if needs_rows and n > 1:
            raise BadProposal("a sampled tree came without its draft rows")
        return
    if not isinstance(rows, SparseRows):
        raise BadProposal("draft rows must be SparseRows")
    if rows.shape != (n, vocab_size):
        raise BadProposal(f"draft rows have shape {rows.shape}, expected {(n, vocab_size)}")
    vals = rows.values
    sums = vals.sum(dim=1)  # [N]
    if not bool(vals.isfinite().all()):
        raise BadProposal("draft rows contain NaN or infinite values")
    if vals.numel() and float(vals.amin()) < 0.0:
        raise BadProposal("draft rows contain negative probabilities")
    bad = (sums - 1.0).abs() > ROW_SUM_TOL
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise BadProposal(f"draft row {row} sums to {float(sums[row]):.6f}, not 1")
    try:
        rows.check_no_duplicates()
    except ValueError as e:
        raise BadProposal(str(e)) from None
    if n > 1:
        parents = tree.parents[1:]
        hit = rows.indices[parents] == tree.tokens[1:, None]  # [N - 1, K]
        at = (rows.values[parents] * hit).sum(dim=1)  # [N - 1]
        if bool((at <= 0).any()):
            node = int((at <= 0).nonzero()[0]) + 1
            raise BadProposal(
                f"node {node} (token {tree.token_list[node]}) has draft probability 0 under "
                "its parent's row: the tree was not drawn from these rows"
            )
