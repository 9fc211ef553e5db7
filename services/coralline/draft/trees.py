"""Tree shapes and budgets: pure functions over candidate scores, acceptance statistics and the
measured cost of a target forward. No models here.

Two ways to shape a draft tree:
- dynamic (EAGLE-2, deterministic, for T = 0 and EAGLE's verifier): candidates carry their
  cumulative draft log-probability; the tree is the best `budget - 1` of them (+ root). A child
  never outranks its parent (scores only fall along a path), so the choice is a tree.
- template (for sampled trees, T > 0): the shape is FIXED before any token is drawn, then every
  node's children are the first k tokens of a draw without replacement. Keeping a data-dependent
  subset of children would bias the kept tokens and break losslessness; a template cannot. The
  template is Sequoia-style: nodes are added greedily by value = product of the measured
  acceptance rates alpha[rank] along the path, a child of rank r only after its rank r-1 sibling.

Budget chooser: expected tokens per round E(N) (1 + the values of the N - 1 best nodes, scaled by
a running calibration) divided by the cost t_draft + t_target(N) from the measured cost table;
N is the size that maximises expected tokens per second on this machine.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

# t(n)/t(1) of a SmolLM2-135M fp32 forward over n tree nodes after 200 cached tokens, on a 2-core
# CPU (Xeon), one thread, linear layers transposed (TargetConfig.cpu_linears; TargetRunner.
# forward_costs, 2026-11-26); replaced by a measurement on the machine at hand when one is given.
DEFAULT_COST = {
    1: 1.0,
    2: 1.12,
    3: 1.18,
    4: 1.38,
    6: 1.52,
    8: 1.70,
    12: 1.84,
    16: 1.95,
    24: 2.11,
    32: 2.30,
    48: 2.71,
    64: 3.09,
}


@dataclass
class CostModel:
    """Relative cost of one round: target forward over n nodes + the draft's work."""

    table: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_COST))
    draft_cost: float = 0.3  # drafting a tree, in units of t(1); fixed, so a seed reproduces
    # a generation (observe_draft_ms calibrates it explicitly, e.g. after a warm-up)
    t1_ms: float = 51.0  # one plain target step in ms (SmolLM2 fp32, 2-core CPU, bench engine)

    @classmethod
    def measured(cls, ms_by_size: dict[int, float]) -> CostModel:
        """From measured milliseconds per forward size (TargetRunner.forward_costs)."""
        t1 = ms_by_size[min(ms_by_size)]
        return cls(table={n: ms / t1 for n, ms in ms_by_size.items()}, t1_ms=t1)

    def under_load(self, hint: Sequence[tuple[int, float]]) -> CostModel:
        """This model's drafting time against a verifier's round costs [(nodes, ms)] under its
        load (batching/costs.py): the table is the hint's, the drafting cost the same ms."""
        if not hint:
            return self
        ms_by_size = dict(hint)
        t1 = ms_by_size[min(ms_by_size)]
        if t1 <= 0:
            raise ValueError("round costs must be positive")
        draft = self.draft_cost * self.t1_ms / t1
        return CostModel({n: ms / t1 for n, ms in ms_by_size.items()}, draft, t1)

    def observe_draft_ms(self, ms: float) -> None:
        """Running estimate of the drafting cost of one round."""
        self.draft_cost = 0.9 * self.draft_cost + 0.1 * ms / self.t1_ms

    def target(self, n: int) -> float:
        keys = sorted(self.table)
        if n <= keys[0]:
            return self.table[keys[0]]
        for a, b in itertools.pairwise(keys):
            if a <= n <= b:
                w = (n - a) / (b - a)
                return self.table[a] * (1 - w) + self.table[b] * w
        last, prev = keys[-1], keys[-2]
        slope = (self.table[last] - self.table[prev]) / (last - prev)
        return self.table[last] + slope * (n - last)

    def round_cost(self, n: int) -> float:
        return self.target(n) + self.draft_cost


def choose_budget(
    values: Sequence[float],  # value of each candidate node, best first (root excluded)
    cost: CostModel,
    calibration: float = 1.0,
    sizes: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    max_nodes: int = 64,
) -> int:
    """The tree size N (root included) maximising (1 + calibration * sum of the N-1 best
    values) / round_cost(N)."""
    best_n, best_rate = 1, 1.0 / cost.round_cost(1)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    for n in sizes:
        if n > max_nodes or n - 1 > len(values):
            continue
        rate = (1.0 + calibration * prefix[n - 1]) / cost.round_cost(n)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def select_dynamic(
    parents: Sequence[int],  # [M] candidate's parent: -1 = the root, else a candidate index
    scores: Sequence[float],  # [M] cumulative log-probability
    budget: int,  # nodes including the root
) -> list[int]:
    """Indices of the best `budget - 1` candidates, ordered so parents come first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: max(0, budget - 1)]
    chosen = set(order)
    for i in order:  # scores fall along paths, so parents are chosen; guard against ties
        p = parents[i]
        if p >= 0 and p not in chosen:
            raise ValueError("candidate scores must not increase along a path")
    return sorted(order, key=lambda i: _depth(parents, i) * 10**9 + i)


def _depth(parents: Sequence[int], i: int) -> int:
    d = 0
    while i >= 0:
        i = parents[i]
        d += 1
    return d


def template(alpha: Sequence[float], budget: int, max_depth: int) -> list[int]:
    """Parents (node 0 = root) of the Sequoia-style template with `budget` nodes.

    alpha[r]: chance that a rank-r child is the accepted one when its parent is reached.
    Greedy: always add the open slot of highest value (parent value * alpha[rank]); opening a
    node's rank-r child opens its rank r+1 sibling and its own rank-0 child."""
    parents, value, depth = [-1], [1.0], [0]
    heap: list[tuple[float, int, int, int]] = []  # (-value, tie, parent, rank)
    tie = 0

    def push(parent: int, rank: int) -> None:
        nonlocal tie
        if rank < len(alpha) and depth[parent] < max_depth and alpha[rank] > 0:
            heapq.heappush(heap, (-value[parent] * alpha[rank], tie, parent, rank))
            tie += 1

    push(0, 0)
    while len(parents) < budget and heap:
        neg, _, parent, rank = heapq.heappop(heap)
        parents.append(parent)
        value.append(-neg)
        depth.append(depth[parent] + 1)
        node = len(parents) - 1
        push(parent, rank + 1)
        push(node, 0)
    return parents


def template_values(alpha: Sequence[float], max_nodes: int, max_depth: int) -> list[float]:
    """Values of the nodes of the largest template, in the order the greedy adds them."""
    parents = template(alpha, max_nodes, max_depth)
    rank, value = [0] * len(parents), [1.0] * len(parents)
    seen: dict[int, int] = {}
    for i, p in enumerate(parents[1:], start=1):
        rank[i] = seen.get(p, 0)
        seen[p] = rank[i] + 1
        value[i] = value[p] * alpha[rank[i]]
    return value[1:]


@dataclass
class AcceptanceStats:
    """Running acceptance statistics of one drafter, for the budget chooser.

    alpha[r] = accepted rank-r children / rank-r children offered at a reached parent.
    calibration = observed accepted drafts / predicted (dynamic trees' summed path probability).
    """

    max_rank: int = 10
    alpha: list[float] = field(
        default_factory=lambda: [0.6, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01]
    )
    calibration: float = 1.0
    decay: float = 0.98  # ~50 rounds of memory
    _offered: list[float] = field(default_factory=list)
    _taken: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._offered = [10.0] * self.max_rank  # a prior worth ten observations
        self._taken = [10.0 * a for a in self.alpha[: self.max_rank]]

    def update(
        self,
        children: Sequence[Sequence[int]],
        accepted: Sequence[int],
        predicted: float | None = None,
    ) -> None:
        """children: the tree's children lists; accepted: node indices of the accepted path."""
        for r in range(self.max_rank):
            self._offered[r] *= self.decay
            self._taken[r] *= self.decay
        path = list(accepted)
        for k, node in enumerate(path):
            kids = children[node]
            nxt = path[k + 1] if k + 1 < len(path) else None
            for r, c in enumerate(kids[: self.max_rank]):
                self._offered[r] += 1.0
                if c == nxt:
                    self._taken[r] += 1.0
                    break  # later siblings were not needed
        self.alpha = [min(0.99, t / o) for t, o in zip(self._taken, self._offered, strict=True)]
        if predicted is not None and predicted > 0:
            observed = len(path) - 1
            ratio = max(0.05, min(3.0, observed / predicted))
            self.calibration = self.decay * self.calibration + (1 - self.decay) * ratio


@dataclass
class LookupRate:
    """Running acceptance rate of prompt-lookup tokens put into a tree: accepted lookup tokens /
    lookup tokens reached (a token is reached when all before it were accepted)."""

    rate: float = 0.5
    decay: float = 0.95
    _offered: float = 4.0  # a prior worth four observations
    _taken: float = 2.0

    def update(self, chain: Sequence[int], tree, path: Sequence[int]) -> None:
        """chain: the lookup tokens offered; tree: the TokenTree sent; path: its accepted nodes."""
        offered = tree.walk(chain)  # the budget may have left the rest of the chain out
        taken = 0
        while taken < len(offered) and taken + 1 < len(path) and path[taken + 1] == offered[taken]:
            taken += 1
        reached = min(len(offered), taken + 1)
        if reached == 0:
            return
        self._offered = self.decay * self._offered + reached
        self._taken = self.decay * self._taken + taken
        self.rate = min(0.95, max(0.05, self._taken / self._offered))
