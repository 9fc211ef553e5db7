"""Exact enumeration: the law of what a verifier emits, with every coin integrated out.

Used by the losslessness tests and by the demo/benchmarks (exact expected acceptance length).
It runs the REAL verifier code: the coins are replaced by `ScriptedCoins`, which replays every
sequence of random decisions (each bernoulli branch and each categorical outcome) with its
probability, so the law computed here is the law of the shipped code, not of a re-derivation.

Pieces:
  PrefixModel       a tiny "language model": prefix (tuple of tokens) -> probabilities [V]
  TreeShape         a template of child counts (chain, star, binary, unbalanced, ...)
  enumerate_trees   every tree a sampling scheme can draw on a template, with its probability
  outcome_law       law of (emitted tokens) for one tree, by replaying the coins
  emitted_law       law of the emitted sequence over trees and coins
  target_law / extend_law / tv_distance / expected_acceptance

Knows nothing about real models; vocabularies of 3-5 tokens and trees of up to ~8 nodes.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from coralline.sampling import warp
from coralline.tree import TokenTree

SCHEMES = ("sampled_swor", "sampled_iid", "deterministic")
Law = dict[tuple[int, ...], float]


@dataclass
class PrefixModel:
    """Deterministic random next-token distributions keyed by the whole prefix.

    style: "flat" (logits ~ N(0, 0.5^2)), "peaked" (N(0, 3^2)) or "onehot" (T = 0 rows).
    holes: how many tokens get probability 0 in each row (at least one token keeps mass).
    temperature/top_p: optional warping applied to the raw logits, as sampling would.
    base/noise: when base is given, logits = base's raw logits + noise * N(0, 1): a draft model
    that resembles its target (acceptance well above chance), as trained drafters do.
    """

    vocab_size: int
    seed: int
    style: str = "flat"
    holes: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    base: PrefixModel | None = None
    noise: float = 1.0
    _logits: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    _cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.style not in ("flat", "peaked", "onehot"):
            raise ValueError(f"unknown style {self.style!r}")
        if not 0 <= self.holes < self.vocab_size:
            raise ValueError("holes must leave at least one token with mass")

    def logits(self, prefix: Sequence[int]) -> torch.Tensor:  # [V] float64, -inf at holes
        key = tuple(int(t) for t in prefix)
        logits = self._logits.get(key)
        if logits is None:
            digest = hashlib.sha256(repr((self.seed, key)).encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            scale = {"flat": 0.5, "peaked": 3.0, "onehot": 1.0}[self.style]
            noise = torch.randn(self.vocab_size, generator=g, dtype=torch.float64)
            if self.base is None:
                logits = noise * scale
            else:
                logits = self.base.logits(key).clone()  # keeps the base's holes
                logits += self.noise * noise
            if self.holes:
                holes = torch.randperm(self.vocab_size, generator=g)[: self.holes]
                logits[holes] = float("-inf")
            self._logits[key] = logits
        return logits

    def __call__(self, prefix: Sequence[int]) -> torch.Tensor:  # [V] float64
        key = tuple(int(t) for t in prefix)
        row = self._cache.get(key)
        if row is None:
            logits = self.logits(key)
            if self.style == "onehot":
                row = warp(logits, temperature=0.0).double()
            else:
                row = warp(logits, self.temperature, 0, self.top_p).double()
                row = row / row.sum()
            self._cache[key] = row
        return row


@dataclass(frozen=True)
class TreeShape:
    """A template tree: parents[i] of template node i (parents[0] = -1). A scheme draws the
    children of each realised node; with a small support fewer children (and subtrees) appear."""

    name: str
    parents: tuple[int, ...]

    @property
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for i, p in enumerate(self.parents[1:], start=1):
            kids[p].append(i)
        return kids

    @property
    def depth(self) -> int:
        d = [0] * len(self.parents)
        for i, p in enumerate(self.parents[1:], start=1):
            d[i] = d[p] + 1
        return max(d)

    @classmethod
    def chain(cls, depth: int) -> TreeShape:
        return cls(f"chain{depth}", (-1, *range(depth)))

    @classmethod
    def star(cls, width: int) -> TreeShape:
        return cls(f"star{width}", (-1,) + (0,) * width)


SHAPES = {
    "single": TreeShape("single", (-1,)),
    "chain3": TreeShape.chain(3),
    "star3": TreeShape.star(3),
    "binary2": TreeShape("binary2", (-1, 0, 0, 1, 1, 2, 2)),
    "unbalanced": TreeShape("unbalanced", (-1, 0, 0, 1, 3, 1)),
}


def _child_sequences(
    q: torch.Tensor, k: int, scheme: str
) -> Iterator[tuple[tuple[int, ...], float]]:  # q [V]
    """Every ordered child-token sequence a scheme can draw from q, with its probability."""
    support = [t for t in range(q.numel()) if float(q[t]) > 0.0]
    if scheme == "deterministic":
        order = sorted(support, key=lambda t: (-float(q[t]), t))
        yield tuple(order[:k]), 1.0
    elif scheme == "sampled_iid":
        for seq in itertools.product(support, repeat=k):
            yield seq, float(torch.prod(q[list(seq)])) if seq else 1.0
    elif scheme == "sampled_swor":
        for seq in itertools.permutations(support, min(k, len(support))):
            prob, left = 1.0, 1.0
            for t in seq:
                prob *= float(q[t]) / left
                left -= float(q[t])
            yield seq, prob
    else:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def enumerate_trees(
    shape: TreeShape, draft: PrefixModel, context: Sequence[int], scheme: str
) -> Iterator[tuple[TokenTree, float]]:
    """Every tree the scheme can draw on `shape` after `context` (whose last token is the root),
    with its probability. Children keep their draw order; node order is the template's."""
    kids = shape.children
    root = int(context[-1])
    ctx = tuple(int(t) for t in context[:-1])

    def expand(frontier: list[tuple[int, int, tuple[int, ...]]], nodes: list[tuple[int, int]]):
        # frontier: (template node, realised node index, token path from the root)
        if not frontier:
            yield nodes, 1.0
            return
        (tnode, rnode, path), rest = frontier[0], frontier[1:]
        tkids = kids[tnode]
        if not tkids:
            yield from expand(rest, nodes)
            return
        q = draft(ctx + path)
        for seq, prob in _child_sequences(q, len(tkids), scheme):
            if prob == 0.0:
                continue
            new_nodes = list(nodes)
            new_front = list(rest)
            for tk, tok in zip(tkids, seq, strict=False):
                new_nodes.append((tok, rnode))
                new_front.append((tk, len(new_nodes) - 1, (*path, tok)))
            for done, p_rest in expand(new_front, new_nodes):
                yield done, prob * p_rest

    for nodes, prob in expand([(0, 0, (root,))], [(root, -1)]):
        # BFS over the template yields a topological order already (parents before children)
        yield TokenTree.from_parents([t for t, _ in nodes], [p for _, p in nodes]), prob


def tree_rows(
    tree: TokenTree, model: PrefixModel, context: Sequence[int]
) -> torch.Tensor:  # [N, V] float64
    """Row i = model's distribution after context[:-1] + path tokens of node i."""
    ctx = tuple(int(t) for t in context[:-1])
    return torch.stack([model(ctx + tree.path_tokens(i)) for i in range(tree.num_nodes)])


class ScriptedCoins:
    """Coins that replay a script of choices and record the untaken branches.

    Each decision is (option index); bernoulli(p) has options (True: p, False: 1 - p) unless p
    is 0 or 1 (no branch); categorical has one option per token with mass.
    """

    def __init__(self, script: Sequence[int]) -> None:
        self.script = list(script)
        self.taken: list[int] = []
        self.options: list[int] = []  # number of options at each decision
        self.weight = 1.0

    def _decide(self, probs: list[float]) -> int:
        i = len(self.taken)
        choice = self.script[i] if i < len(self.script) else 0
        self.taken.append(choice)
        self.options.append(len(probs))
        self.weight *= probs[choice]
        return choice

    def bernoulli(self, p: float) -> bool:
        if p >= 1.0:
            return True
        if p <= 0.0:
            return False
        return self._decide([p, 1.0 - p]) == 0

    def categorical(self, probs: torch.Tensor) -> int:
        row = probs.double()
        total = float(row.sum())
        support = torch.nonzero(row > 0).flatten().tolist()
        if len(support) == 1:
            return support[0]
        pick = self._decide([float(row[t]) / total for t in support])
        return support[pick]


def outcome_law(run: Callable[[ScriptedCoins], Sequence[int]]) -> Law:
    """Law of run(coins)'s result over every coin sequence (depth-first over the scripts)."""
    law: Law = defaultdict(float)
    stack: list[list[int]] = [[]]
    while stack:
        script = stack.pop()
        coins = ScriptedCoins(script)
        out = tuple(run(coins))
        law[out] += coins.weight
        for j in range(len(script), len(coins.taken)):
            for alt in range(1, coins.options[j]):
                stack.append([*coins.taken[:j], alt])
    return dict(law)


def emitted_law(
    verify: Callable,
    scheme: str,
    shape: TreeShape,
    target: PrefixModel,
    draft: PrefixModel,
    context: Sequence[int],
    *,
    draft_rows_as: Callable[[torch.Tensor], object] = lambda rows: rows,
) -> Law:
    """Law of the tokens one verification round emits (accepted drafts + bonus)."""
    law: Law = defaultdict(float)
    for tree, p_tree in enumerate_trees(shape, draft, context, scheme):
        mb = tree_rows(tree, target, context)
        ms = draft_rows_as(tree_rows(tree, draft, context))

        def run(coins, tree=tree, mb=mb, ms=ms):
            return verify(tree, mb, ms, coins).emitted_tokens(tree)

        for seq, p in outcome_law(run).items():
            law[seq] += p_tree * p
    return dict(law)


def target_law(target: PrefixModel, context: Sequence[int], length: int) -> Law:
    """Exact law of the target's next `length` tokens."""
    ctx = tuple(int(t) for t in context)
    law: Law = {}
    for seq in itertools.product(range(target.vocab_size), repeat=length):
        p = 1.0
        for j, tok in enumerate(seq):
            p *= float(target(ctx + seq[:j])[tok])
            if p == 0.0:
                break
        if p > 0.0:
            law[seq] = p
    return law


def extend_law(law: Law, target: PrefixModel, context: Sequence[int], length: int) -> Law:
    """Extend every emitted prefix to `length` tokens with the target's exact continuation."""
    ctx = tuple(int(t) for t in context)
    out: Law = defaultdict(float)
    for prefix, p in law.items():
        if len(prefix) > length:
            raise ValueError(f"emitted {len(prefix)} tokens, more than length={length}")
        for rest in itertools.product(range(target.vocab_size), repeat=length - len(prefix)):
            q = p
            seq = prefix + rest
            for j in range(len(prefix), length):
                q *= float(target(ctx + seq[:j])[seq[j]])
                if q == 0.0:
                    break
            if q > 0.0:
                out[seq] += q
    return dict(out)


def tv_distance(a: Law, b: Law) -> float:
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)


def expected_acceptance(
    verify: Callable | str,
    scheme: str,
    shape: TreeShape,
    target: PrefixModel,
    draft: PrefixModel,
    context: Sequence[int],
) -> float:
    """Exact expected tokens per round (accepted drafts + bonus) = the round's tau."""
    if isinstance(verify, str):
        from coralline.verification import get_verifier

        verify = get_verifier(verify).fn
    law = emitted_law(verify, scheme, shape, target, draft, context)
    return sum(len(seq) * p for seq, p in law.items())


def sample_tree(
    shape: TreeShape,
    draft: PrefixModel,
    context: Sequence[int],
    scheme: str,
    generator: torch.Generator,
) -> TokenTree:
    """Draw one tree the way a drafter would (the Monte Carlo twin of enumerate_trees):
    SWOR children by Gumbel-top-k, i.i.d. children by multinomial, deterministic by top-k."""
    from coralline.sampling import sample_without_replacement

    kids = shape.children
    ctx = tuple(int(t) for t in context[:-1])
    tokens, parents = [int(context[-1])], [-1]
    frontier = [(0, 0, (int(context[-1]),))]
    while frontier:
        tnode, rnode, path = frontier.pop(0)
        k = len(kids[tnode])
        if k == 0:
            continue
        q = draft(ctx + path)
        if scheme == "sampled_swor":
            seq = sample_without_replacement(q, k, generator).tolist()
        elif scheme == "sampled_iid":
            seq = torch.multinomial(q, k, replacement=True, generator=generator).tolist()
        elif scheme == "deterministic":
            seq = next(_child_sequences(q, k, scheme))[0]
        else:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
        for tk, tok in zip(kids[tnode], seq, strict=False):
            tokens.append(int(tok))
            parents.append(rnode)
            frontier.append((tk, len(tokens) - 1, (*path, int(tok))))
    return TokenTree.from_parents(tokens, parents)
