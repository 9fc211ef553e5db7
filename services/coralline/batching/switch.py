"""When speculation pays under load: one session's switch between speculative and plain rounds.

Speculation buys tokens per round (tau > 1) with time: the drafter's round trip and a larger
batched forward. Under load the price rises: the drafter serves every session (a queue), the
trees of all sessions make the shared forward leave its flat region, and the drafter's own
compute competes with the verifier's. Past some load, a plain round (no drafter, the root
alone) gives a session more tokens per second. The budget alone cannot find that point: a
root-only proposal still pays the drafter round trip. So each session decides, before every
round, whether to ask the drafter at all (the engine's `speculate` hook):

  speculative rate  = tau / period      measured on its speculative rounds
  plain rate        = 1 / period        measured on its plain rounds
where a round's period runs from its start to the next round's start: the drafter's answer,
the batched forward (with the wait for the batch), acceptance, the KV commit, streaming the
chunk, all of it. The mode not in use is predicted from the one in use by swapping the parts
that differ (S = sessions sharing the forward, t(T) = the cost table's ms for T tokens,
costs.py, c = how much slower than the table the batched forwards run now: the other
processes on the machine, the drafter among them):
  plain period  ~ spec period - draft_ms - spec forward_ms + c * t(S)
  spec period   ~ plain period - plain forward_ms + draft_ms + c * t(S * n)   (n: the
                  session's tree size on its last speculative rounds)
It changes mode when the other one is predicted faster by `margin`, and a plain session asks the
drafter again every `probe_every` plain rounds so that tau and the drafting time stay current.
One session (S <= 1) always speculates: a lone session's rounds never depend on load. Nor does
a session switch before `min_rounds` speculative rounds were measured; the first round is not
measured at all (its proposal waits for the drafter to read the whole prompt).

Lossless either way: a plain round is plain decoding, with the same keyed coins. The drafter is
told what it missed at its next round (the engine sends the committed backlog and its features).

Pure: numbers in, a decision out; knows nothing of gRPC, drafters or the scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from coralline.batching.costs import LoadPolicy


@dataclass(frozen=True)
class SwitchConfig:
    margin: float = 0.10  # the other mode must be predicted this much faster to switch
    probe_every: int = 16  # plain rounds between two speculative probes
    smoothing: float = 0.2  # weight of the newest round in the running means
    min_rounds: int = 3  # speculative rounds measured before the first switch

    def __post_init__(self) -> None:
        if self.margin < 0 or self.probe_every < 1 or not 0 < self.smoothing <= 1:
            raise ValueError("margin >= 0, probe_every >= 1 and 0 < smoothing <= 1 required")
        if self.min_rounds < 1:
            raise ValueError("min_rounds must be >= 1")


class _Mean:
    """An exponential running mean (None until the first value)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


class SpeculationSwitch:
    """One session's decision, round by round (the engine's `speculate` hook)."""

    def __init__(
        self,
        policy: LoadPolicy,
        sessions: Callable[[], int],
        config: SwitchConfig | None = None,
        slowdown: Callable[[], float] | None = None,
    ) -> None:
        """sessions(): sessions sharing the forward now; slowdown(): c above (None: 1)."""
        self.policy = policy
        self.sessions = sessions
        self.slowdown = slowdown or (lambda: 1.0)
        self.config = c = config or SwitchConfig()
        w = c.smoothing
        # speculative rounds: tokens (1 + accepted), period, drafter wait, forward (with the
        # wait for the batch), tree nodes; plain rounds: period, forward
        self.tokens, self.spec_period, self.draft_ms = _Mean(w), _Mean(w), _Mean(w)
        self.spec_forward, self.nodes = _Mean(w), _Mean(w)
        self.plain_period, self.plain_forward = _Mean(w), _Mean(w)
        self.speculating = True
        self.measured = 0  # speculative rounds in the means
        self.plain_run = 0  # plain rounds since the last speculative one
        self.switches = 0

    def __call__(self, last, now_ns: int | None = None) -> bool:
        """Speculate this round? `last`: the previous round's RoundStats (None: the first);
        now_ns: this round's start (default: the clock), which ends the last one's period."""
        if last is not None:
            now = time.time_ns() if now_ns is None else now_ns
            self.observe(last, (now - last.start_ns) / 1e6)
        return self.decide()

    def observe(self, stats, period_ms: float) -> None:
        if stats.fallback is not None or stats.round <= 1:  # a failed drafter, or the Open:
            return  # neither says what a speculative round costs
        if stats.plain:
            self.plain_period.add(period_ms)
            self.plain_forward.add(stats.forward_ms)
            return
        self.measured += 1
        self.tokens.add(1 + stats.accepted)
        self.spec_period.add(period_ms)
        self.draft_ms.add(stats.draft_ms)
        self.spec_forward.add(stats.forward_ms)
        self.nodes.add(stats.tree_nodes)

    def rates(self, sessions: int) -> tuple[float, float] | None:
        """(speculative, plain) tokens per ms predicted at this load; None: nothing measured."""
        tau, period, d, fwd = (
            m.value for m in (self.tokens, self.spec_period, self.draft_ms, self.spec_forward)
        )
        if tau is None or period is None or d is None or fwd is None:
            return None
        c = self.slowdown()
        plain_fwd = c * self.policy.cost(sessions)
        p, pf = self.plain_period.value, self.plain_forward.value
        if self.speculating or p is None or pf is None:
            spec_ms = period
            plain_ms = max(period - d - fwd + plain_fwd, plain_fwd)
        else:  # the speculative forward as the table has it now (the load may have changed)
            spec_fwd = c * self.policy.cost(max(1, round(sessions * self.nodes.value)))
            spec_ms, plain_ms = max(p - pf + d + spec_fwd, d + spec_fwd), p
        return tau / max(spec_ms, 1e-6), 1.0 / max(plain_ms, 1e-6)

    def decide(self) -> bool:
        s = self.sessions()
        enough = self.measured >= self.config.min_rounds
        rates = self.rates(s) if s > 1 and enough else None
        if rates is None:  # one session, or too little measured yet
            want = True
        else:
            spec, plain = rates
            margin = 1.0 + self.config.margin
            want = plain <= spec * margin if self.speculating else spec > plain * margin
        if not want and not self.speculating and self.plain_run >= self.config.probe_every:
            want = True  # a probe: measure tau and the drafter's time as they are now
        if want != self.speculating:
            self.switches += 1
            self.speculating = want
        self.plain_run = 0 if want else self.plain_run + 1
        return want
