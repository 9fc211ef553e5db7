"""TokenTree: the draft tree as data, and the pure views derived from it.

Node 0 is the root: the last committed token (not a draft). Every other node has a parent with a
smaller index, so node order is topological. Row i of any per-node matrix (target rows, draft
rows, features) belongs to node i and describes the token AFTER node i's path.

Knows nothing about models, probabilities or verification: only the shape of the tree, its
attention mask and positions. Every view is a pure function of (tokens, parents), computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch


@dataclass(frozen=True, eq=False)
class TokenTree:
    """A validated token tree.

    tokens: [N] int64, token id of each node (tokens[0] is the root = last committed token)
    parents: [N] int64, parents[0] == -1 and 0 <= parents[i] < i for i > 0
    vocab_size: when given, every token must lie in [0, vocab_size)
    """

    tokens: torch.Tensor  # [N] int64
    parents: torch.Tensor  # [N] int64
    vocab_size: int | None = field(default=None)

    def __post_init__(self) -> None:
        tokens = torch.as_tensor(self.tokens)
        parents = torch.as_tensor(self.parents)
        if tokens.dim() != 1 or parents.dim() != 1:
            raise ValueError(
                f"tokens and parents must be 1-D, got shapes {tuple(tokens.shape)} and "
                f"{tuple(parents.shape)}"
            )
        if tokens.numel() == 0:
            raise ValueError("a token tree needs at least the root node; got an empty tree")
        if tokens.shape != parents.shape:
            raise ValueError(
                f"tokens and parents must have the same length, got {tokens.numel()} tokens and "
                f"{parents.numel()} parents"
            )
        if tokens.dtype.is_floating_point or parents.dtype.is_floating_point:
            raise ValueError("tokens and parents must be integer tensors")
        tokens = tokens.to(dtype=torch.int64, device="cpu").contiguous()
        parents = parents.to(dtype=torch.int64, device="cpu").contiguous()
        if int(parents[0]) != -1:
            raise ValueError(f"parents[0] must be -1 (node 0 is the root), got {int(parents[0])}")
        if tokens.numel() > 1:
            idx = torch.arange(1, tokens.numel())
            bad = (parents[1:] < 0) | (parents[1:] >= idx)
            if bool(bad.any()):
                i = int(idx[bad][0])
                raise ValueError(
                    f"parents[{i}] = {int(parents[i])} is out of order: every non-root node's "
                    f"parent must be an earlier node (0 <= parents[i] < i)"
                )
        if bool((tokens < 0).any()):
            i = int(torch.nonzero(tokens < 0)[0])
            raise ValueError(f"tokens[{i}] = {int(tokens[i])} is negative")
        if self.vocab_size is not None:
            if self.vocab_size <= 0:
                raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
            if bool((tokens >= self.vocab_size).any()):
                i = int(torch.nonzero(tokens >= self.vocab_size)[0])
                raise ValueError(
                    f"tokens[{i}] = {int(tokens[i])} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_parents(
        cls, tokens: Sequence[int], parents: Sequence[int], vocab_size: int | None = None
    ) -> TokenTree:
        """Build from plain lists: tokens[N], parents[N] (parents[0] = -1)."""
        return cls(
            torch.tensor(list(tokens), dtype=torch.int64),
            torch.tensor(list(parents), dtype=torch.int64),
            vocab_size,
        )

    @classmethod
    def from_paths(
        cls, root_token: int, paths: Iterable[Sequence[int]], vocab_size: int | None = None
    ) -> TokenTree:
        """Merge token paths (each continuing the root) into a trie.

        Shared prefixes become shared nodes; nodes are numbered in order of first appearance,
        so the first path's nodes are 1..len(path) and sibling order follows path order.
        """
        tokens, parents = [int(root_token)], [-1]
        child_of: dict[tuple[int, int], int] = {}
        for path in paths:
            node = 0
            for tok in path:
                key = (node, int(tok))
                if key not in child_of:
                    child_of[key] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                node = child_of[key]
        return cls.from_parents(tokens, parents, vocab_size)

    @classmethod
    def chain(cls, root_token: int, drafts: Sequence[int], vocab_size: int | None = None):
        """A single path: root -> drafts[0] -> drafts[1] -> ..."""
        return cls.from_paths(root_token, [drafts], vocab_size)

    @classmethod
    def root_only(cls, root_token: int) -> TokenTree:
        """The root alone (`chain(root_token, [])`): a plain decoding step's tree. Shared, as
        trees are immutable and their views computed once: a session decoding plainly reuses
        them instead of building and validating a tree (and its mask) every round."""
        return _root_only(int(root_token))

    # ---------------------------------------------------------------- basic views
    @property
    def num_nodes(self) -> int:
        return int(self.tokens.numel())

    def __len__(self) -> int:
        return self.num_nodes

    def __repr__(self) -> str:
        return f"TokenTree(tokens={self.tokens.tolist()}, parents={self.parents.tolist()})"

    @cached_property
    def parent_list(self) -> tuple[int, ...]:
        return tuple(self.parents.tolist())

    @cached_property
    def token_list(self) -> tuple[int, ...]:
        return tuple(self.tokens.tolist())

    @cached_property
    def depth(self) -> torch.Tensor:  # [N] int64, root has depth 0
        d = [0] * self.num_nodes
        for i, p in enumerate(self.parent_list[1:], start=1):
            d[i] = d[p] + 1
        return torch.tensor(d, dtype=torch.int64)

    @cached_property
    def max_depth(self) -> int:
        """The deepest node's depth (0 = the root alone)."""
        return int(self.depth.max()) if self.num_nodes > 1 else 0

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """children[i]: node indices of i's children, in node order (= drafting order)."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, p in enumerate(self.parent_list[1:], start=1):
            kids[p].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.children) if not k)

    @cached_property
    def is_chain(self) -> bool:
        """True when no node has more than one child (a single path from the root)."""
        return all(len(k) <= 1 for k in self.children)

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` carrying `token` (the first, in node order), or None."""
        return next((c for c in self.children[node] if self.token_list[c] == token), None)

    def walk(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """Nodes below the root spelling the longest prefix of `tokens` that is a tree path."""
        out: list[int] = []
        node = 0
        for tok in tokens:
            nxt = self.child(node, tok)
            if nxt is None:
                break
            out.append(nxt)
            node = nxt
        return tuple(out)

    def path(self, node: int) -> tuple[int, ...]:
        """Node indices root..node (root first)."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} is outside the tree (0..{self.num_nodes - 1})")
        out = []
        while node != -1:
            out.append(node)
            node = self.parent_list[node]
        return tuple(reversed(out))

    def path_tokens(self, node: int) -> tuple[int, ...]:
        """Tokens along root..node (root token first)."""
        return tuple(self.token_list[i] for i in self.path(node))

    # ---------------------------------------------------------------- attention views
    @cached_property
    def ancestor_mask(self) -> torch.Tensor:  # [N, N] bool
        """mask[i, j] is True when j is i or an ancestor of i (node i may attend to node j)."""
        n = self.num_nodes
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            p = self.parent_list[i]
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def attention_mask(
        self, prefix_len: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:  # [N, prefix_len + N]
        """Float additive mask for a forward of the N tree nodes after a cached prefix.

        0 where attention is allowed (the whole cached prefix, and the node's own path inside the
        tree), the dtype's most negative finite value elsewhere. Float, not bool: a bool mask gives
        wrong logits with eager attention in transformers 5.x.
        """
        if prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
        n = self.num_nodes
        out = torch.full((n, prefix_len + n), torch.finfo(dtype).min, dtype=dtype)
        out[:, :prefix_len] = 0
        out[:, prefix_len:].masked_fill_(self.ancestor_mask, 0)
        return out

    def position_ids(self, prefix_len: int) -> torch.Tensor:  # [N] int64
        """Absolute positions: the root sits right after the cached prefix, children one deeper."""
        if prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
        return self.depth + prefix_len


@lru_cache(maxsize=4096)
def _root_only(root_token: int) -> TokenTree:
    return TokenTree.chain(root_token, [])
