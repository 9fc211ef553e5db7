"""What every verifier shares: the result type, input validation, and row access.

A verifier is `verify(tree, target_probs, draft_probs, rng, *, check=True) -> VerifyResult`:
  tree          TokenTree with N nodes (node 0 = root = last committed token)
  target_probs  [N, V] Mb rows: row i = warped target distribution after node i's path
  draft_probs   [N, V] dense Ms rows, or SparseRows, or None for verifiers that ignore them
  rng           torch.Generator, or a Coins object (the exact enumerator passes its own)
  check         validate the inputs (shapes, finite, non-negative, rows summing to 1); the
                engine turns it off for rows it computed itself
Knows nothing about models, KV caches or gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins
from coralline.tree import TokenTree

ROW_SUM_TOL = 1e-3  # float32 softmax rows over 262k tokens still sum to 1 within ~1e-5
DraftProbs = torch.Tensor | SparseRows | None


@dataclass(frozen=True)
class VerifyResult:
    """accepted: node indices of the accepted path, root first; bonus_token: the extra token."""

    accepted: tuple[int, ...]
    bonus_token: int

    @property
    def num_accepted(self) -> int:
        """Accepted draft tokens (the root is not a draft)."""
        return len(self.accepted) - 1

    @property
    def num_emitted(self) -> int:
        """Tokens this round emits: accepted drafts + the bonus (= tau for one round)."""
        return len(self.accepted)

    def emitted_tokens(self, tree: TokenTree) -> list[int]:
        return [tree.token_list[i] for i in self.accepted[1:]] + [self.bonus_token]


class Verifier(Protocol):
    def __call__(
        self,
        tree: TokenTree,
        target_probs: torch.Tensor,
        draft_probs: DraftProbs,
        rng: torch.Generator | Coins,
        *,
        check: bool = True,
    ) -> VerifyResult: ...


@dataclass(frozen=True)
class VerifierSpec:
    """Registry entry: the function and the tree-sampling assumption it is lossless under."""

    fn: Verifier
    tree_kind: str  # "any" (greedy), "sampled_swor", "sampled_iid", "deterministic"
    needs_draft: bool
    chain_only: bool = False
    lossless: bool = True
    doc: str = field(default="")


def _check_rows(name: str, rows: torch.Tensor, n: int) -> int:
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, V], got {type(rows)}")
    if rows.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, V], got shape {tuple(rows.shape)}")
    if rows.shape[0] != n:
        raise ValueError(f"{name} has {rows.shape[0]} rows but the tree has {n} nodes")
    if not rows.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {rows.dtype}")
    if rows.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension")
    return int(rows.shape[1])


def _check_values(name: str, values: torch.Tensor, sums: torch.Tensor) -> None:
    # NaN/inf anywhere makes the row sum non-finite; amin catches negatives (and NaN). Two
    # float32 passes: ~1 ms for [64, 49152] on one core (a float64 copy costs 20x more).
    if not bool(torch.isfinite(sums).all()):
        row = int(torch.nonzero(~torch.isfinite(sums))[0])
        raise ValueError(f"{name} row {row} contains NaN or infinite values")
    if values.numel() and not float(values.amin()) >= 0.0:
        raise ValueError(f"{name} contains negative probabilities")
    bad = (sums - 1.0).abs() > ROW_SUM_TOL
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} row {row} sums to {float(sums[row]):.6f}, not 1 (tolerance {ROW_SUM_TOL}): "
            "pass probabilities after warping, not logits"
        )


class Inputs:
    """Validated verifier inputs plus the per-node scalars every verifier needs.

    target_at[i] = Mb(token_i | parent_i), draft_at[i] = Ms(token_i | parent_i) (root: 1.0).
    """

    def __init__(
        self,
        tree: TokenTree,
        target_probs: torch.Tensor,  # [N, V]
        draft_probs: DraftProbs,
        *,
        needs_draft: bool,
        swor: bool = False,
        chain_only: bool = False,
        check: bool = True,
        name: str = "verifier",
    ) -> None:
        n = tree.num_nodes
        if check:
            if not isinstance(tree, TokenTree):
                raise ValueError(f"tree must be a TokenTree, got {type(tree)}")
            vocab = _check_rows("target_probs", target_probs, n)
            _check_values("target_probs", target_probs, target_probs.sum(dim=1))
            if int(tree.tokens.max()) >= vocab:
                raise ValueError(
                    f"tree token {int(tree.tokens.max())} is outside the vocabulary [0, {vocab})"
                )
            if chain_only and not tree.is_chain:
                raise ValueError(f"{name} verifies a single chain; this tree branches")
            if needs_draft:
                if draft_probs is None:
                    raise ValueError(f"{name} needs draft_probs (the draft rows), got None")
                if isinstance(draft_probs, SparseRows):
                    if draft_probs.shape != (n, vocab):
                        raise ValueError(
                            f"draft rows have shape {draft_probs.shape}, expected {(n, vocab)}"
                        )
                    _check_values("draft_probs", draft_probs.values, draft_probs.values.sum(dim=1))
                    draft_probs.check_no_duplicates()
                else:
                    _check_rows("draft_probs", draft_probs, n)
                    if tuple(draft_probs.shape) != (n, vocab):
                        raise ValueError(
                            f"draft_probs has shape {tuple(draft_probs.shape)}, expected "
                            f"{(n, vocab)}"
                        )
                    _check_values("draft_probs", draft_probs, draft_probs.sum(dim=1))
            if swor:
                for node, kids in enumerate(tree.children):
                    toks = [tree.token_list[c] for c in kids]
                    if len(set(toks)) != len(toks):
                        raise ValueError(
                            f"node {node} has two children with the same token: {name} assumes "
                            "children drawn without replacement"
                        )
        self.tree = tree
        self.target = target_probs
        self.vocab = int(target_probs.shape[1])
        self.draft = draft_probs if needs_draft else None
        parents = tree.parents.clamp_min(0)
        self.target_at: list[float] = target_probs[parents, tree.tokens].double().tolist()
        self.target_at[0] = 1.0
        self.draft_at: list[float] = [1.0] * n
        if self.draft is not None:
            if isinstance(self.draft, SparseRows):
                hit = self.draft.indices[parents] == tree.tokens[:, None]  # [N, K]
                at = (self.draft.values[parents].double() * hit).sum(dim=1)
            else:
                at = self.draft[parents, tree.tokens].double()
            self.draft_at = at.tolist()
            self.draft_at[0] = 1.0
            if check:
                for i in range(1, n):
                    if not self.draft_at[i] > 0.0:
                        raise ValueError(
                            f"node {i} (token {tree.token_list[i]}) has draft probability 0 "
                            f"under its parent's draft row: the tree was not sampled from these "
                            "draft rows"
                        )

    # ------------------------------------------------------------------ row access
    def target_row(self, i: int) -> torch.Tensor:  # [V] float64
        return self.target[i].double()

    def draft_row(self, i: int) -> torch.Tensor:  # [V] float64
        if isinstance(self.draft, SparseRows):
            return self.draft.row(i)
        assert self.draft is not None  # guarded by needs_draft at construction
        return self.draft[i].double()

    def draft_support(self, i: int) -> tuple[np.ndarray | None, np.ndarray]:
        """(token ids [K], probabilities [K]) of row i; ids None means the dense row (K = V)."""
        if isinstance(self.draft, SparseRows):
            vals = self.draft.values[i].double()
            keep = vals > 0
            return self.draft.indices[i][keep].numpy(), vals[keep].numpy()
        return None, self.draft_row(i).numpy()

    def residual_mass(self, i: int, p: float) -> float:
        """S = sum_v max(0, p Mb(v|i) - Ms(v|i)) under node i's ORIGINAL rows.

        SparseRows: O(K), because off the draft support the terms are p Mb(v) and Mb sums to 1.
        """
        if isinstance(self.draft, SparseRows):
            ms = self.draft.values[i].double()  # [K]
            mb = self.target[i, self.draft.indices[i]].double() * (ms > 0)  # [K]
            off_support = max(0.0, 1.0 - float(mb.sum()))
            return p * off_support + float((p * mb - ms).clamp_min_(0.0).sum())
        # dense: in the rows' own dtype (float64 rows stay exact), accumulated in float64
        r = (self.target[i] * p).sub_(self.draft[i]).clamp_min_(0.0)
        return float(r.sum(dtype=torch.float64))

    def residual_row(self, i: int, p: float) -> torch.Tensor:  # [V] float64
        """norm(max(0, p Mb(.|i) - Ms(.|i))) under node i's original rows (see `residual`)."""
        return residual(p * self.target_row(i), self.draft_row(i))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # [V] float64
    """norm(max(p - q, 0)); when the residual has no mass (p <= q everywhere, so p = q up to
    rounding and a rejection had probability ~0), p itself is returned unchanged."""
    r = (p - q).clamp_min_(0.0)
    s = float(r.sum())
    return r / s if s > 0.0 else p
