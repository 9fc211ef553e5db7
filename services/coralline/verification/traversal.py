"""Traversal Verification (Weng et al., NeurIPS 2025, arXiv 2505.12398): leaf-to-root,
sequence-level acceptance over a whole token tree. Lossless when each node's children are a
prefix of a draw WITHOUT replacement (SWOR) from that node's draft row Ms.

    init  p(root) = 1; top-down for each child X (token x) of P:
          p(X) = min(1, p(P) Mb(x|P) / Ms(x|P))
    loop  X = first leaf in DFS post-order (always follow the FIRST remaining child)
          X is the root: accept the empty path; bonus ~ current Mb(.|root); stop
          u < p(X) (u ~ U(0,1)): accept root..X; bonus ~ CURRENT Mb(.|X); stop
          else delete X and update its parent P with the OLD Ms(.|P) (x included):
            r(v) = max(0, p(P) Mb(v|P) - Ms(v|P)),  S = sum_v r(v)
            Mb(.|P) <- r / S;  Ms(.|P) <- Ms(.|P) with x zeroed, renormalised
            p(P) <- S / (S + 1 - p(P))   (the root stays 1; S = 0 gives p(P) = 0)
            recompute p top-down for P's remaining descendants

Cost. Only rows of nodes that lose a child are ever touched. With SparseRows (support K) a
deletion costs O(K): off the draft support, Mb(.|P) is only rescaled, so a row is kept as
(scale, explicit values on the support); the residual mass of every untouched row is computed
for all nodes in one vectorised pass at the start. The single O(V) step is the bonus draw.
Dense draft rows work too (K = V). Rounding guard: S = 0 at the root keeps Mb(.|root) (a
rejection there had probability ~0); elsewhere S = 0 makes p(P) = 0, as the formula says.

Knows nothing about models or KV caches; the tests check it against exact enumeration and
against block verification (verification/block.py) on chains.
"""

from __future__ import annotations

import numpy as np
import torch

from coralline.rows import SparseRows
from coralline.sampling import Coins, as_coins
from coralline.tree import TokenTree
from coralline.verification.common import Inputs, VerifyResult


class _Row:
    """Current Mb(.|P) and Ms(.|P) of a node that lost a child.

    Mb_cur(v) = scale * Mb_orig(v) off the support T, mb[j] on T; Ms_cur is ms on T, 0 off T.
    ids None means T is the whole vocabulary (dense draft rows).
    """

    def __init__(self, inp: Inputs, node: int) -> None:
        self.ids, self.ms = inp.draft_support(node)  # [K], [K]
        target = inp.target[node]
        if self.ids is None:
            self.mb = target.double().numpy().copy()  # [V]
            self.out = 0.0
            self.pos = None
        else:
            self.mb = target[torch.from_numpy(self.ids)].double().numpy()  # [K]
            self.out = max(0.0, 1.0 - float(self.mb.sum()))  # Mb_orig mass off the support
            self.pos = {int(t): j for j, t in enumerate(self.ids)}
        self.ms = self.ms.copy()
        self.scale = 1.0
        self._target = target

    def at(self, x: int) -> tuple[float, float]:
        """(Mb_cur(x), Ms_cur(x))."""
        if self.pos is None:
            return float(self.mb[x]), float(self.ms[x])
        j = self.pos.get(x)
        if j is None:
            return self.scale * float(self._target[x]), 0.0
        return float(self.mb[j]), float(self.ms[j])

    def _index(self, x: int) -> int | None:
        return x if self.pos is None else self.pos.get(x)

    def residual_mass(self, p: float) -> float:
        return p * self.scale * self.out + float(np.maximum(p * self.mb - self.ms, 0.0).sum())

    def update_target(self, p: float, s: float) -> None:
        """Mb <- max(0, p Mb - Ms) / S."""
        if s > 0.0:
            self.mb = np.maximum(p * self.mb - self.ms, 0.0) / s
            self.scale = p * self.scale / s

    def update_draft(self, x: int) -> None:
        """Ms <- Ms with x zeroed, renormalised."""
        j = self._index(x)
        if j is not None:
            self.ms[j] = 0.0
            total = float(self.ms.sum())
            if total > 0.0:
                self.ms /= total

    def dense_target(self) -> torch.Tensor:  # [V] float64
        row = self.scale * self._target.double()
        if self.pos is None:
            return torch.from_numpy(self.mb)
        row[torch.from_numpy(self.ids)] = torch.from_numpy(self.mb)
        return row


class Traversal:
    """One traversal over one tree. Subclassed only by the tests' negative controls."""

    def __init__(self, inp: Inputs, coins: Coins) -> None:
        self.inp, self.coins, self.tree = inp, coins, inp.tree
        n = self.tree.num_nodes
        self.kids = [list(k) for k in self.tree.children]  # remaining children, in order
        parents = self.tree.parent_list
        # ratio[i] = Mb(x_i|P) / Ms(x_i|P) under P's ORIGINAL rows
        self.ratio = [inp.target_at[i] / inp.draft_at[i] for i in range(n)]
        self.p = [1.0] * n
        for i in range(1, n):
            self.p[i] = min(1.0, self.p[parents[i]] * self.ratio[i])
        self.p0 = list(self.p)
        self.rows: dict[int, _Row] = {}  # nodes whose rows changed and still have children
        self.rows_done: dict[int, _Row] = {}  # changed rows of nodes that became leaves
        self.pending: dict[int, tuple[float, float]] = {}  # node -> (p, S) of its last update
        self.s_fresh = self._fresh_residual_masses()

    def _fresh_residual_masses(self) -> list[float] | None:
        """S of every node's ORIGINAL rows at its initial p, in one pass (SparseRows only)."""
        draft = self.inp.draft
        if not isinstance(draft, SparseRows):
            return None
        ms = draft.values.double()  # [N, K]
        mb = self.inp.target.gather(1, draft.indices).double() * (ms > 0)  # [N, K]
        p = torch.tensor(self.p0, dtype=torch.float64)[:, None]  # [N, 1]
        off_support = (1.0 - mb.sum(dim=1)).clamp_min(0.0)  # [N]
        s = p[:, 0] * off_support + (p * mb - ms).clamp_min(0.0).sum(dim=1)
        return s.tolist()

    # ------------------------------------------------------------------ the algorithm
    def run(self) -> VerifyResult:
        node = 0
        while True:
            while self.kids[node]:
                node = self.kids[node][0]
            if node == 0:
                return self.accept(0)
            if self.coins.bernoulli(self.p[node]):
                return self.accept(node)
            parent = self.tree.parent_list[node]
            self.delete(node, parent)
            node = parent

    def accept(self, node: int) -> VerifyResult:
        row = self.bonus_row(node)
        if not float(row.sum()) > 0.0:
            # S was rounding noise (true S = 0): this acceptance had probability ~0
            row = self.inp.target[node]
        return VerifyResult(self.tree.path(node), self.coins.categorical(row))

    def delete(self, node: int, parent: int) -> None:
        x = self.tree.token_list[node]
        self.kids[parent].remove(node)
        p_old = self.p[parent]
        row = self.rows.get(parent)
        if row is None and not self.kids[parent]:
            # The last child of an untouched row: only S is needed (and, on acceptance, the
            # residual row, rebuilt lazily by bonus_row from the pending (p, S)).
            if self.s_fresh is not None and p_old == self.p0[parent]:
                s = self.s_fresh[parent]
            else:
                s = self.inp.residual_mass(parent, p_old)
            self.pending[parent] = (p_old, s)
        else:
            if row is None:
                row = self.rows[parent] = _Row(self.inp, parent)
            s = row.residual_mass(p_old)
            row.update_target(p_old, s)
            self.update_draft(row, x)
            if not self.kids[parent]:
                del self.rows[parent]
                self.rows_done[parent] = row
        if parent != 0:
            self.p[parent] = s / (s + 1.0 - p_old) if s > 0.0 else 0.0
        if self.kids[parent]:
            self.refresh_subtree(parent, self.rows[parent])

    def update_draft(self, row: _Row, x: int) -> None:
        row.update_draft(x)

    def refresh_subtree(self, parent: int, row: _Row) -> None:
        """Recompute p top-down below `parent` after its rows changed."""
        stack = []
        for child in self.kids[parent]:
            mb, ms = row.at(self.tree.token_list[child])
            self.p[child] = min(1.0, self.p[parent] * mb / ms) if ms > 0.0 else 0.0
            stack.extend(self.kids[child])
        # Deeper nodes: their parents are still unvisited (the traversal only enters a subtree
        # through its first remaining child), so their rows are the original ones.
        while stack:
            d = stack.pop()
            self.p[d] = min(1.0, self.p[self.tree.parent_list[d]] * self.ratio[d])
            stack.extend(self.kids[d])

    def bonus_row(self, node: int) -> torch.Tensor:  # [V]
        """The CURRENT Mb(.|node)."""
        row = self.rows_done.get(node)
        if row is not None:
            return row.dense_target()
        if node in self.pending:
            p, s = self.pending[node]
            if s > 0.0:
                return self.inp.residual_row(node, p)
        return self.inp.target[node]


def verify_traversal(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [N, V]
    draft_probs: torch.Tensor | SparseRows | None,  # [N, V] or SparseRows
    rng: torch.Generator | Coins,
    *,
    check: bool = True,
    impl: type[Traversal] = Traversal,
) -> VerifyResult:
    inp = Inputs(
        tree, target_probs, draft_probs, needs_draft=True, swor=True, check=check, name="traversal"
    )
    return impl(inp, as_coins(rng)).run()
