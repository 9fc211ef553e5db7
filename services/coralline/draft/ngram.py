"""N-gram (prompt-lookup) drafter: model-free continuations found in the context itself.

Find the longest suffix of the context (max_ngram down to min_ngram tokens) that occurred
earlier; propose what followed it. With no match the tree is the root alone (a plain step).
With max_paths = 1 it proposes one chain from the most recent
match (like Hugging Face's prompt-lookup decoding); with max_paths > 1 it merges the distinct
continuations of the most recent matches into a tree. Deterministic: no draft rows, so it pairs
with EAGLE's verifier at T > 0 and greedy at T = 0.

Knows nothing about models; keeps only the token context.
"""

from __future__ import annotations

from dataclasses import dataclass

from coralline.draft.base import DraftInput, DraftProposal
from coralline.sampling import SamplingParams
from coralline.tree import TokenTree


@dataclass(frozen=True)
class NgramConfig:
    max_ngram: int = 3  # longer matches predict better; 3 is prompt-lookup's usual choice
    min_ngram: int = 2  # one-token matches are mostly wrong and still cost a wider forward
    num_tokens: int = 5  # on a 2-core CPU a 6-token forward costs ~1.7x one token (bench)
    max_paths: int = 1  # 1 = a chain; more = a tree of distinct continuations

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if self.num_tokens < 1 or self.max_paths < 1:
            raise ValueError("num_tokens and max_paths must be >= 1")


class NgramDrafter:
    name = "ngram"
    tree_kind = "deterministic"

    def __init__(self, config: NgramConfig | None = None) -> None:
        self.config = config or NgramConfig()
        self.chain_only = self.config.max_paths == 1
        self.context: list[int] = []

    def reset(self) -> None:
        self.context = []

    def propose(self, step: DraftInput, params: SamplingParams) -> DraftProposal:
        self.context.extend(step.new_ids)
        return DraftProposal(TokenTree.from_paths(self.context[-1], self.paths()), None)

    def paths(self) -> list[list[int]]:
        """Distinct continuations of the context's suffix, the most recent match first."""
        ctx, cfg = self.context, self.config
        n = len(ctx)
        paths: list[list[int]] = []
        for size in range(min(cfg.max_ngram, n - 1), cfg.min_ngram - 1, -1):
            suffix = ctx[n - size :]
            # most recent occurrence first; the match must end before the suffix itself
            for start in range(n - size - 1, -1, -1):
                if ctx[start : start + size] == suffix:
                    cont = ctx[start + size : start + size + cfg.num_tokens]
                    if cont and cont not in paths:
                        paths.append(cont)
                        if len(paths) == cfg.max_paths:
                            return paths
            if paths:
                return paths
        return paths
