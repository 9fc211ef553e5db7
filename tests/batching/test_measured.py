"""batching/measured.py: the verifier-wide choice between speculation and plain decoding by the
aggregate tokens/s measured at each load level, on a simulated clock."""

from dataclasses import dataclass

import pytest

from coralline.batching.measured import MeasuredConfig, MeasuredSwitch, level


@dataclass
class Round:  # the part of engine.RoundStats the switch reads
    accepted: int


class Sim:
    """Rounds on a simulated clock: each mode commits `tokens` per round of `seconds` (per
    session); `sessions` share the verifier."""

    def __init__(self, switch: MeasuredSwitch, clock: list[float], sessions: list[int]):
        self.switch, self.clock, self.sessions = switch, clock, sessions
        self.last: Round | None = None  # the previous round (None: none yet)

    def run(self, seconds: float, spec=(3, 0.03), plain=(1, 0.006)) -> list[bool]:
        """Round-robin over the sessions for `seconds`; -> the mode of each round."""
        end, out = self.clock[0] + seconds, []
        while self.clock[0] < end:
            mode = self.switch(self.last)
            tokens, dt = spec if mode else plain
            self.clock[0] += dt / self.sessions[0]  # the sessions' rounds interleave
            self.last = Round(accepted=tokens - 1)
            out.append(mode)
        return out


def make(sessions: int, **kw):
    clock, n = [0.0], [sessions]
    cfg = MeasuredConfig(**{"window_s": 1.0, "settle_s": 0.1, **kw})
    switch = MeasuredSwitch(lambda: n[0], cfg, clock=lambda: clock[0])
    return switch, Sim(switch, clock, n)


def test_levels_are_powers_of_two():
    assert [level(s) for s in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 1, 2, 4, 4, 8, 8, 16, 16, 32]


def test_one_session_always_speculates_even_where_plain_is_faster():
    switch, sim = make(1)
    assert all(sim.run(20.0, spec=(2, 0.05), plain=(1, 0.001)))
    assert set(switch.rates) == {(1, True)} and switch.switches == 0  # measured, never used


def test_plain_wins_where_it_is_faster_and_speculation_is_probed():
    # 16 sessions: speculation 3 tokens / 30 ms per session = 100 tok/s per session,
    # plain 1 token / 6 ms = 167: plain should run most of the time
    switch, sim = make(16, probe_every=4)
    modes = sim.run(30.0)
    assert set(switch.rates) == {(16, True), (16, False)}
    assert switch.rates[(16, False)] > switch.rates[(16, True)]
    tail = modes[len(modes) // 3 :]
    assert sum(not m for m in tail) / len(tail) > 0.6  # mostly plain once both are measured
    assert any(tail)  # speculation still gets its probe windows
    # each figure is the measured rate: 16 sessions x 1 token / 6 ms, x 3 tokens / 30 ms
    assert switch.rates[(16, False)] == pytest.approx(16 / 0.006, rel=0.05)
    assert switch.rates[(16, True)] == pytest.approx(16 * 3 / 0.03, rel=0.05)


def test_speculation_stays_where_it_pays():
    switch, sim = make(4, probe_every=4)
    modes = sim.run(30.0, spec=(3, 0.012), plain=(1, 0.008))  # 250 vs 125 tok/s per session
    tail = modes[len(modes) // 3 :]
    assert sum(tail) / len(tail) > 0.6 and not all(tail)  # mostly speculating, plain probed
    assert switch.rates[(4, True)] > switch.rates[(4, False)]


def test_levels_are_measured_apart_and_a_window_across_levels_does_not_count():
    switch, sim = make(2)
    sim.run(5.3)  # windows end at ~1, 2, .., 5 s
    counted = switch.windows
    assert counted >= 4 and {lvl for lvl, _ in switch.rates} == {2}
    sim.sessions[0] = 3  # level 4 from the middle of the window that ends at ~6 s
    sim.run(1.1)
    assert switch.windows == counted  # that window did not count
    sim.run(5.0)
    assert {lvl for lvl, _ in switch.rates} == {2, 4}


def test_a_window_with_a_short_dip_in_load_counts_for_the_level_that_held():
    # a session leaving and the next one joining: a few rounds at level 1 in a level-2 window
    switch, sim = make(2)
    sim.run(3.3)
    counted = switch.windows
    sim.sessions[0] = 1
    sim.run(0.05)  # ~2 rounds of one session in the window that ends at ~4 s
    sim.sessions[0] = 2
    sim.run(1.0)
    assert switch.windows == counted + 1  # it counted ...
    assert {lvl for lvl, _ in switch.rates} == {2}  # ... for level 2
    # without the share rule (every round at one level) the same window would not count
    strict, sim = make(2, level_share=1.0)
    sim.run(3.3)
    counted = strict.windows
    sim.sessions[0] = 1
    sim.run(0.05)
    sim.sessions[0] = 2
    sim.run(1.0)
    assert strict.windows == counted


def test_a_window_closing_in_a_dip_to_one_session_keeps_the_busy_levels_choice():
    # 8 sessions, plain faster (1 / 4 ms against 3 / 30 ms per session): plain is chosen
    switch, sim = make(8, probe_every=1000, max_probe_every=1000)
    sim.run(10.5, plain=(1, 0.004))
    assert not switch.speculating
    # the window closes while the others are between requests: one session for a few rounds
    closes = switch.windows
    sim.sessions[0] = 1
    _until(sim, lambda: switch.windows > closes, plain=(1, 0.004))
    sim.sessions[0] = 8
    modes = sim.run(0.5, plain=(1, 0.004))
    assert not any(modes) and not switch.speculating  # still plain: the dip chose nothing


def test_a_quiet_window_does_not_count():
    switch, sim = make(8, min_tokens=10_000)
    assert all(sim.run(10.0))  # nothing measured: it keeps speculating
    assert switch.windows == 0 and switch.rates == {}


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="window_s"):
        MeasuredConfig(window_s=0)
    with pytest.raises(ValueError, match="settle_s"):
        MeasuredConfig(window_s=1, settle_s=1)
    with pytest.raises(ValueError, match="probe_every"):
        MeasuredConfig(probe_every=0)
    with pytest.raises(ValueError, match="max_probe_every"):
        MeasuredConfig(probe_every=8, max_probe_every=4)
    with pytest.raises(ValueError, match="level_share"):
        MeasuredConfig(level_share=0.5)


def test_the_verifiers_metrics_show_what_the_switch_chose_and_measured():
    from prometheus_client import generate_latest

    from coralline.telemetry.metrics import VerifierMetrics

    metrics = VerifierMetrics()
    idle = generate_latest(metrics.registry).decode()  # no switch: plain mode 0, no figures
    assert "coralline:speculation_plain_mode 0.0" in idle
    assert "coralline:speculation_switches_total 0.0" in idle
    assert "coralline:speculation_measured_tokens_per_second{" not in idle
    switch, sim = make(16, probe_every=4)
    metrics.measured.watch(switch)
    sim.run(10.0)
    speculating, switches, rates = switch.snapshot()
    assert switches >= 1 and set(rates) == {(16, True), (16, False)}
    text = generate_latest(metrics.registry).decode()
    assert f"coralline:speculation_plain_mode {0.0 if speculating else 1.0}" in text
    assert f"coralline:speculation_switches_total {float(switches)}" in text
    for (lvl, spec), rate in rates.items():
        mode = "speculative" if spec else "plain"
        line = f'coralline:speculation_measured_tokens_per_second{{level="{lvl}",mode="{mode}"}}'
        assert f"{line} {rate!r}" in text


def test_a_clear_choice_is_probed_ever_less_often():
    # plain 167 tok/s per session against speculation's 100: each probe finds speculation
    # clearly behind, so the interval doubles from 4 windows to the cap of 16
    switch, sim = make(16, probe_every=4, max_probe_every=16)
    sim.run(100.0)
    assert switch._interval[16] == 16
    before = switch.switches
    modes = sim.run(100.0)
    probes = (switch.switches - before) / 2  # a probe switches there and back
    assert 100 / 17 - 1 <= probes <= 100 / 17 + 1  # one window in 17, not one in 5
    assert sum(modes) / len(modes) < 0.1


def test_a_close_choice_keeps_its_probes_and_a_change_is_found():
    # within the margin (250 vs 240 tok/s per session): the interval stays at probe_every
    switch, sim = make(4, probe_every=4, max_probe_every=16)
    sim.run(60.0, spec=(3, 0.012), plain=(1, 0.004166))
    assert switch._interval[4] == 4
    # a clear choice for plain decoding backs its probes off ...
    sim.run(100.0, spec=(3, 0.03), plain=(1, 0.004))
    assert switch._interval[4] == 16 and not switch.speculating
    # ... and when speculation becomes much faster, the next probe finds it (within the cap)
    sim.run(20.0, spec=(3, 0.004), plain=(1, 0.004))
    modes = sim.run(20.0, spec=(3, 0.004), plain=(1, 0.004))
    assert sum(modes) / len(modes) > 0.7 and switch.speculating
    assert switch.rates[(4, True)] > 2 * switch.rates[(4, False)]


def _until(sim, done, **rates) -> list[bool]:
    """Run round by round until done(); -> the modes of the rounds run (the last one's is the
    mode chosen by the window close that made done() true: the next window's)."""
    modes = []
    while not done():
        modes += sim.run(1e-9, **rates)  # one round
    return modes


def test_a_new_level_above_one_where_plain_won_starts_plain_and_probes_speculation_later():
    # level 4: plain 1 token / 4 ms per session against speculation's 3 / 30 ms (250 vs 100)
    switch, sim = make(4, probe_every=4)
    sim.run(20.0, plain=(1, 0.004))
    assert switch.rates[(4, False)] > switch.rates[(4, True)]
    # level 16, never measured: it decodes plainly from its first window (not speculating
    # first, as at level 4), and speculation gets its window as a probe 4 windows on
    sim.sessions[0] = 16
    before = switch.windows
    modes = _until(sim, lambda: (16, True) in switch.rates, plain=(1, 0.004))
    plain_windows = switch.windows - before - 1  # the last one counted is the probe
    assert plain_windows >= 4 and (16, False) in switch.rates
    probe = [i for i, m in enumerate(modes) if m]
    assert probe and all(not m for m in modes[: probe[0]])  # plain until the probe
    assert all(modes[probe[0] : -1])  # one speculating window
    assert switch.rates[(16, False)] > switch.rates[(16, True)] and not switch.speculating


def test_a_new_level_above_one_where_speculation_won_starts_speculating():
    fast = {"spec": (3, 0.012), "plain": (1, 0.008)}  # 250 vs 125 tok/s per session
    switch, sim = make(2, probe_every=4)
    sim.run(10.0, **fast)
    assert switch.rates[(2, True)] > switch.rates[(2, False)]
    sim.sessions[0] = 4
    modes = _until(sim, lambda: (4, True) in switch.rates, **fast)
    first = modes.index(True)  # (the rounds before: the window across the change)
    assert all(modes[first:-1])  # speculation first at the new level ...
    _until(sim, lambda: (4, False) in switch.rates, **fast)  # ... then plain decoding
