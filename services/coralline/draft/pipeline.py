"""The speculation cache: drafting round r + 1 while round r is being verified.

`SpeculationCache` wraps a drafter built with `pipeline=True` (draft/coral_drafter.py). Right
after a proposal is sent, `predraft(params)` names the outcome the drafter expects (its guess:
the most probable path and bonus token), drafts the next round as if that outcome had been
committed, and keeps the result with an undo record of the drafter's state. When the Commit
arrives, `propose(step)` answers from the cache if the commit is the guessed one (same accepted
nodes, same new ids) and the round's cost model is the one the pre-draft used; otherwise it
undoes the pre-draft and drafts for the real commit.

Exact by construction: the pipelined drafter's rule (sync a guessed outcome's tokens with its
own head outputs, then re-sync them with the target's features one round later) depends only
on the committed ids and the history, and draft randomness is keyed by (seed, committed
length), so the pre-drafted tree and rows are the ones drafting after the Commit would give.
tests/draft/test_pipeline.py checks it round by round against the same drafter without a cache.

Reports: hits, misses, the drafting time hidden (pre-drafts that were used) and wasted.
Knows nothing about gRPC or threads: the caller runs predraft when it likes, and never
concurrently with propose.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from coralline.draft.base import DraftInput, DraftProposal
from coralline.sampling import SamplingParams


def _cost_key(drafter) -> tuple | None:
    cost = getattr(drafter, "cost", None)
    if cost is None:
        return None
    return (tuple(sorted(cost.table.items())), cost.draft_cost, cost.t1_ms)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # pre-drafts thrown away (another outcome, or the cost model changed)
    hidden_ms: float = 0.0  # drafting time of the pre-drafts that answered a Commit
    wasted_ms: float = 0.0  # drafting time of the thrown-away pre-drafts

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class _Entry:
    guess: object  # coral_drafter.Guess
    proposal: DraftProposal
    undo: dict
    cost: tuple | None
    ms: float


class SpeculationCache:
    """A drafter whose next proposal may be drafted ahead of the Commit (see the docstring)."""

    def __init__(self, drafter) -> None:
        if not getattr(getattr(drafter, "config", None), "pipeline", False):
            raise ValueError("the speculation cache needs a drafter built with pipeline=True")
        self.drafter = drafter
        self.name = drafter.name
        self.tree_kind = drafter.tree_kind
        self.chain_only = drafter.chain_only
        self.stats = CacheStats()
        self._entry: _Entry | None = None

    # the drafter service sets these per round; they belong to the wrapped drafter
    @property
    def cost(self):
        return self.drafter.cost

    @cost.setter
    def cost(self, value) -> None:
        self.drafter.cost = value

    @property
    def timeline(self):
        return self.drafter.timeline

    @timeline.setter
    def timeline(self, value) -> None:
        self.drafter.timeline = value

    def reset(self) -> None:
        self.drafter.reset()
        self._entry = None

    def predraft(self, params: SamplingParams) -> bool:
        """Draft the next round for the expected outcome of the last proposal; -> whether a
        pre-draft was made (there is a guess)."""
        d = self.drafter
        d.finish_guess()
        g = d.guess
        self._entry = None
        if g is None:
            return False
        undo = _checkpoint(d)
        t0 = time.perf_counter()
        try:
            proposal = d.propose(DraftInput(g.new_ids, g.features, g.accepted), params)
        except BaseException:
            _restore(d, undo)  # as if nothing was pre-drafted
            raise
        ms = (time.perf_counter() - t0) * 1e3
        self._entry = _Entry(g, proposal, undo, _cost_key(d), ms)
        return True

    def propose(self, step: DraftInput, params: SamplingParams) -> DraftProposal:
        entry, self._entry = self._entry, None
        d = self.drafter
        if entry is not None:
            if (
                step.features is not None
                and entry.guess.matches(step)
                and entry.cost == _cost_key(d)
            ):
                d._lagged = (tuple(step.new_ids), step.features)  # the target's, for later
                self.stats.hits += 1
                self.stats.hidden_ms += entry.ms
                return entry.proposal
            _restore(d, entry.undo)
            self.stats.misses += 1
            self.stats.wasted_ms += entry.ms
        return d.propose(step, params)


def _checkpoint(d) -> dict:
    """What a propose changes in a CoralDrafter, to undo a pre-draft."""
    return {
        "num_cached": d.num_cached,
        "last_out": d.last_out,
        "stats": copy.deepcopy(d.stats),
        "committed": d.features.committed,
        "lookup_len": len(d._lookup.context),
        "lookup_rate": copy.deepcopy(d.lookup_rate),
        "last": d._last,
        "last_chain": list(d._last_chain),
        "guess": d.guess,
        "lagged": d._lagged,
    }


def _restore(d, c: dict) -> None:
    d._guess_ctx = None
    d.cache.crop(c["num_cached"] - d.cache.get_seq_length())
    d.num_cached = c["num_cached"]
    d.last_out = c["last_out"]
    d.stats = c["stats"]
    d.features.committed = c["committed"]
    del d._lookup.context[c["lookup_len"] :]
    d.lookup_rate = c["lookup_rate"]
    d._last = c["last"]
    d._last_chain = c["last_chain"]
    d.guess = c["guess"]
    d._lagged = c["lagged"]
