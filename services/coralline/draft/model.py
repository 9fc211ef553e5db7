"""Draft-model drafter: a small causal LM (same tokenizer as the target) proposes trees.

The draft model keeps its own KV cache of the committed context (a TargetRunner of its own).
Each round grows a tree layer by layer: one draft forward over the tree so far gives the rows
of the frontier, then every frontier node at depth t gets branching[t] children.
  T > 0: children are the first k tokens of a draw WITHOUT replacement (Gumbel-top-k) from the
         node's warped draft row, truncated to its draft_top_k most likely tokens and sent along
         as SparseRows (tree_kind "sampled_swor": traversal / RRSw verify it losslessly);
  T = 0: children are the k most likely tokens (verified greedily).
The same drafter with branching (1, 1, ...) is classic draft-model speculative decoding.

Knows nothing about verification; it only builds proposals. The trained CORAL head is a
separate drafter (draft/coral.py); this one serves tiny tests and draft-model baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coralline.draft.base import DraftInput, DraftProposal
from coralline.rows import SparseRows
from coralline.sampling import (
    DRAFT,
    SamplingParams,
    keyed_generator,
    sample_without_replacement,
    warp_params,
)
from coralline.tree import TokenTree


@dataclass(frozen=True)
class ModelDrafterConfig:
    branching: tuple[int, ...] = (2, 2, 1, 1)  # children per node at each depth; depth = len
    draft_top_k: int = 64  # support of the draft rows sent to the verifier (SparseRows K)

    def __post_init__(self) -> None:
        if not self.branching or any(k < 1 for k in self.branching):
            raise ValueError("branching must be a non-empty tuple of positive ints")
        if self.draft_top_k < 1:
            raise ValueError("draft_top_k must be >= 1")


class ModelDrafter:
    name = "draft-model"
    tree_kind = "sampled_swor"

    def __init__(self, runner, config: ModelDrafterConfig | None = None) -> None:
        self.runner = runner  # a TargetRunner over the draft model
        self.config = config or ModelDrafterConfig()
        self.chain_only = all(k == 1 for k in self.config.branching)
        self.reset()

    def reset(self) -> None:
        self.runner.reset()
        self.context: list[int] = []

    def _sync(self, new_ids: list[int]) -> None:
        """Cache every committed token but the last (the root), as the target runner does."""
        first = not self.context
        self.context.extend(int(t) for t in new_ids)
        if first:
            self.runner.prefill(self.context)
            return
        pending = self.context[self.runner.num_cached :]  # previous root .. new root
        if len(pending) > 1:
            self.runner.tree_forward(TokenTree.chain(pending[0], pending[1:-1]))
            self.runner.commit(list(range(len(pending) - 1)))

    def propose(self, step: DraftInput, params: SamplingParams) -> DraftProposal:
        self._sync(list(step.new_ids))
        cfg = self.config
        generator = None
        if not params.greedy:
            if params.seed is None:
                raise ValueError("sampled drafting needs params.seed (the engine resolves it)")
            generator = keyed_generator(params.seed, DRAFT, len(self.context))
        tokens, parents = [self.context[-1]], [-1]
        frontier = [0]
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # node -> (ids [K], probs [K])
        for k in cfg.branching:
            tree = TokenTree.from_parents(tokens, parents)
            out = self.runner.tree_forward(tree)
            self.runner.rollback()  # the scratch tree is not committed
            probs = warp_params(out.logits[frontier], params)  # [F, V]
            top = torch.topk(probs, self._k, dim=1)
            new_frontier = []
            for f, node in enumerate(frontier):
                vals = top.values[f] / top.values[f].sum()  # the truncated row actually used
                rows[node] = (top.indices[f], vals)
                if params.greedy:
                    kids = top.indices[f][:k][vals[:k] > 0].tolist()
                else:
                    row = torch.zeros(probs.shape[1]).scatter_(0, top.indices[f], vals)
                    kids = sample_without_replacement(row, k, generator).tolist()
                for tok in kids:
                    tokens.append(int(tok))
                    parents.append(node)
                    new_frontier.append(len(tokens) - 1)
            frontier = new_frontier
        tree = TokenTree.from_parents(tokens, parents)
        rows_out = SparseRows.from_node_rows(tree.num_nodes, rows, self._k, self.runner.vocab_size)
        return DraftProposal(tree, rows_out)

    @property
    def _k(self) -> int:
        return min(self.config.draft_top_k, self.runner.vocab_size)
