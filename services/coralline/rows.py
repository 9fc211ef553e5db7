"""SparseRows: per-node draft distributions with explicit support (the wire format of draft rows).

A drafter that proposes from a truncated distribution (top-k, the grouped LM head's active rows)
knows the exact support of Ms. Sending that support instead of full-vocabulary rows is what
crosses the network, and it lets verifiers compute residual masses in O(K) instead of O(V).

Row i holds the draft distribution of the token after node i's path: `values[i, j]` is the
probability of token `indices[i, j]`; every other token has probability 0. Padding entries have
value 0 (their index is ignored). Knows nothing about trees or verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class SparseRows:
    indices: torch.Tensor  # [N, K] int64, token ids in [0, vocab_size)
    values: torch.Tensor  # [N, K] float, probabilities (0 = padding)
    vocab_size: int

    def __post_init__(self) -> None:
        idx, val = self.indices, self.values
        if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor):
            raise ValueError("SparseRows needs tensors for indices and values")
        if idx.dim() != 2 or idx.shape != val.shape:
            raise ValueError(
                f"SparseRows indices and values must both be [N, K], got {tuple(idx.shape)} and "
                f"{tuple(val.shape)}"
            )
        if idx.dtype.is_floating_point or not val.dtype.is_floating_point:
            raise ValueError("SparseRows indices must be integers and values floating point")
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(f"SparseRows indices must lie in [0, {self.vocab_size})")
        object.__setattr__(self, "indices", idx.to(torch.int64).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.indices.shape[0]), self.vocab_size)

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])

    def check_no_duplicates(self) -> None:
        """Raise ValueError when a row lists the same token twice with positive mass."""
        if self.indices.shape[1] < 2:
            return
        pad = torch.arange(-1, -self.indices.numel() - 1, -1).view_as(self.indices)
        keyed = torch.where(self.values > 0, self.indices, pad)  # padding gets unique negatives
        s = torch.sort(keyed, dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(torch.nonzero(dup)[0])
            raise ValueError(f"draft row {row} lists the same token twice")

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [N, V]
        out = torch.zeros(self.num_rows, self.vocab_size, dtype=dtype)
        return out.scatter_add_(1, self.indices, self.values.to(dtype))

    def row(self, i: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:  # [V]
        out = torch.zeros(self.vocab_size, dtype=dtype)
        return out.scatter_add_(0, self.indices[i], self.values[i].to(dtype))

    @classmethod
    def from_node_rows(
        cls,
        num_rows: int,
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]],  # node -> (token ids [k], probs [k])
        k: int,
        vocab_size: int,
    ) -> SparseRows:
        """Rows of a drafted tree: the given nodes' truncated distributions (the ones their
        children were drawn from); every other node (a leaf) gets a valid uniform row over the
        first k tokens that no verifier reads (rows are only read at nodes with children)."""
        idx = torch.zeros(num_rows, k, dtype=torch.int64)
        val = torch.zeros(num_rows, k)
        for node in range(num_rows):
            if node in rows:
                ids, probs = rows[node]
                idx[node, : ids.numel()] = ids
                val[node, : probs.numel()] = probs
            else:
                idx[node] = torch.arange(k)
                val[node] = 1.0 / k
        return cls(idx, val, vocab_size)

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseRows:  # dense [N, V]
        """Keep each row's nonzero entries (K = the largest support, zero-padded)."""
        if dense.dim() != 2:
            raise ValueError(f"expected a [N, V] tensor, got shape {tuple(dense.shape)}")
        k = max(1, int((dense > 0).sum(dim=1).max())) if dense.numel() else 1
        vals, idx = torch.topk(dense, k, dim=1)
        vals = torch.where(vals > 0, vals, torch.zeros_like(vals))
        return cls(idx, vals, int(dense.shape[1]))
