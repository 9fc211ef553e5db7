"""Speculate or not, for every session of a verifier at once, by measured throughput.

Where the drafter shares the verifier's CPU, speculation pays at a low load and stops paying at
a higher one: on the 2-core machine here, CORAL through the verifier was 1.47x plain decoding
through the same verifier at one session and 0.59x at 16 (docs/batching.md). Where that point
lies depends on the machine, the drafter and the prompts, and predicting it from costs failed
(switch.py: off by default, slower where measured). This measures it instead:

- Time is cut into windows of `window_s`. In a window every session of the verifier either
  speculates or decodes plainly (the engine's `speculate` hook, shared by the sessions), and the
  window's aggregate committed tokens per second is recorded for its load level: the sessions
  sharing the forwards, rounded up to a power of two (2, 4, 8, 16, ...).
- At each level the mode with the better running figure runs. The other one gets a window
  after `probe_every` windows of it, so its figure stays current. A probe that finds the other
  mode still behind by more than `margin` doubles that interval at its level, up to
  `max_probe_every`; one that finds the two within `margin` (or the other ahead) sets it back
  to `probe_every`. So a clear choice costs ever fewer probes, and a close one stays watched.
  A level measured in neither mode starts as the nearest lower level measured in both chose:
  plain decoding where plain decoding won there (on a shared device speculation's value falls
  as load grows, so a level above one where it lost rarely needs it; speculation waits for its
  first probe window), else speculation, and the other mode right after.
- A window counts for the level that held at least `level_share` of its rounds (a session
  leaving and the next one joining makes a dip of a few rounds: those count with the rest).
  It does not count when no level held that share, when it committed fewer than
  `min_tokens`, or for its first `settle_s` after a change of mode (rounds begun in the other
  mode end then).
- One session (level 1) always speculates, so a lone session's rounds never depend on load
  (its windows are still measured: the figure of speculation at level 1, for the metrics).
  A window that closes while the load has dipped to one session (the others between
  requests) sets the next window's mode for the level that held most of its rounds.

Lossless either way: a plain round is plain decoding with the same keyed coins, and the drafter
is told what it missed at its next round (engine.py, as for switch.py).

Pure apart from the clock it is given; knows nothing of gRPC, drafters or the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasuredConfig:
    window_s: float = 1.0  # one measurement window (SmolLM2 on 2 CPU cores: ~40-150 tokens)
    probe_every: int = 6  # windows in the better mode before a window of the other (at first)
    max_probe_every: int = 24  # the longest that interval grows while the choice stays clear
    margin: float = 0.1  # a probe within this fraction of the better mode resets the interval
    min_tokens: int = 16  # a window that committed fewer does not count
    settle_s: float = 0.25  # not counted after a change of mode: rounds begun before it
    smoothing: float = 0.5  # weight of the newest window in a level's running figure
    level_share: float = 0.9  # a window counts for a level that held this share of its rounds

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.settle_s < 0 or self.settle_s >= self.window_s:
            raise ValueError("window_s > 0 and 0 <= settle_s < window_s required")
        if self.probe_every < 1 or self.min_tokens < 1 or not 0 < self.smoothing <= 1:
            raise ValueError("probe_every >= 1, min_tokens >= 1 and 0 < smoothing <= 1 required")
        if self.max_probe_every < self.probe_every or not 0 <= self.margin < 1:
            raise ValueError("max_probe_every >= probe_every and 0 <= margin < 1 required")
        if not 0.5 < self.level_share <= 1:
            raise ValueError("0.5 < level_share <= 1 required")


def level(sessions: int) -> int:
    """The load level of `sessions` sessions: 1, or the power of two at or above it."""
    return 1 if sessions <= 1 else 1 << (sessions - 1).bit_length()


class MeasuredSwitch:
    """The verifier's choice for all its sessions; call it as the engine's `speculate` hook."""

    def __init__(
        self,
        sessions: Callable[[], int],
        config: MeasuredConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """sessions(): the sessions sharing the forwards now (BatchScheduler.sessions)."""
        self.sessions = sessions
        self.config = config or MeasuredConfig()
        self.clock = clock
        self.rates: dict[tuple[int, bool], float] = {}  # (level, speculating) -> tokens / s
        self.speculating = True
        self.windows = 0  # windows counted
        self.switches = 0
        self._lock = threading.Lock()
        self._since_probe: dict[int, int] = {}  # level -> windows in its better mode since
        # the other's last window
        self._interval: dict[int, int] = {}  # level -> windows between probes there now
        self._probing: int | None = None  # the level of the probe window now running
        now = clock()
        self._start = self._count_from = now
        self._tokens = 0
        self._levels: dict[int, int] = {}  # level -> rounds begun at it in this window

    def snapshot(self) -> tuple[bool, int, dict[tuple[int, bool], float]]:
        """(speculating now, switches so far, {(level, speculating): tokens / s}): metrics."""
        with self._lock:
            return self.speculating, self.switches, dict(self.rates)

    def __call__(self, last, now: float | None = None) -> bool:
        """Speculate this round? `last`: this session's previous RoundStats (None: its first)."""
        now = self.clock() if now is None else now
        lvl = level(self.sessions())
        with self._lock:
            if last is not None and now >= self._count_from:
                self._tokens += 1 + last.accepted  # what that round committed
            if now - self._start >= self.config.window_s:
                self._close(now, lvl)
            self._levels[lvl] = self._levels.get(lvl, 0) + 1
            return self.speculating or lvl == 1

    def _close(self, now: float, lvl: int) -> None:  # under self._lock; lvl: the load now
        cfg = self.config
        seconds = now - self._count_from
        rounds = sum(self._levels.values())
        most = max(self._levels, key=self._levels.get, default=0)
        seen = most if rounds and self._levels[most] >= cfg.level_share * rounds else 0  # 0: none
        counted = seen >= 1 and self._tokens >= cfg.min_tokens and seconds > 0
        if counted:  # (level 1 always speculates: its figure is speculation's)
            key, rate = (seen, self.speculating or seen == 1), self._tokens / seconds
            old = self.rates.get(key)
            self.rates[key] = rate if old is None else old + cfg.smoothing * (rate - old)
            self.windows += 1
        if self._probing is not None:  # the window that closes was a probe
            if counted and seen == self._probing:
                self._after_probe(seen, self.speculating)
            self._probing = None
        # one session between requests (level 1, which always speculates) decides nothing: the
        # next window runs what the level that held most of this one wants
        want = self._next(most if lvl == 1 and most > 1 else lvl)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "window: rounds per level %s, %s, %d tokens in %.2f s (%s); next %s at level %d",
                dict(sorted(self._levels.items())), "speculating" if self.speculating else "plain",
                self._tokens, seconds, "counted" if counted else "not counted",
                "speculating" if want else "plain", lvl,
            )  # fmt: skip
        changed = want != self.speculating
        self.switches += changed
        self.speculating = want
        self._start, self._tokens, self._levels = now, 0, {}
        self._count_from = now + (cfg.settle_s if changed else 0.0)

    def _next(self, lvl: int) -> bool:
        spec, plain = self.rates.get((lvl, True)), self.rates.get((lvl, False))
        if lvl == 1:
            return True
        if spec is None and plain is None:
            return not self._plain_below(lvl)
        if plain is None:
            return False
        better = spec is not None and spec >= plain  # spec None: plain by the lower level
        run = self._since_probe.get(lvl, 0)
        if run >= self._interval.get(lvl, self.config.probe_every):
            self._since_probe[lvl] = 0
            self._probing = lvl
            return not better
        self._since_probe[lvl] = run + 1
        return better

    def _plain_below(self, lvl: int) -> bool:
        """Did plain decoding win at the nearest lower level measured in both modes?"""
        both = [v for v, spec in self.rates if spec and v < lvl and (v, False) in self.rates]
        if not both:
            return False
        v = max(both)
        return self.rates[(v, False)] > self.rates[(v, True)]

    def _after_probe(self, lvl: int, probed: bool) -> None:
        """A counted probe of mode `probed` (speculating?) at `lvl`: when it is still behind
        by more than the margin, its next probe waits twice as long; else as long as at first."""
        cfg = self.config
        mine, other = self.rates[(lvl, probed)], self.rates[(lvl, not probed)]
        clear = mine < (1 - cfg.margin) * other
        now = self._interval.get(lvl, cfg.probe_every)
        self._interval[lvl] = min(2 * now, cfg.max_probe_every) if clear else cfg.probe_every
