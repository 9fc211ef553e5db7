"""The speculation switch (batching/switch.py): a session decodes plainly, without asking the
drafter, while speculation is predicted slower at the current load; it asks the drafter again
when the load drops or to re-measure. Pure: the rounds' statistics and periods are given."""

import pytest

from coralline.batching.costs import LoadPolicy
from coralline.batching.switch import SpeculationSwitch, SwitchConfig
from coralline.engine import RoundStats

from .test_costs import TABLE  # flat up to 32 tokens, then linear: t(8) = 52, t(16) = 55

T0 = 10**12  # the previous round's start (ns)


def _spec(accepted: int, draft_ms: float, forward_ms: float, nodes: int = 8, rnd: int = 2):
    return RoundStats(rnd, nodes, accepted, draft_ms, forward_ms + 5, forward_ms=forward_ms,
                      start_ns=T0)  # fmt: skip


def _plain(forward_ms: float) -> RoundStats:
    return RoundStats(2, 1, 0, 0.0, forward_ms + 5, forward_ms=forward_ms, start_ns=T0, plain=True)


def feed(sw: SpeculationSwitch, stats: RoundStats, period_ms: float) -> bool:
    """The next round starts period_ms after `stats`' round started."""
    return sw(stats, now_ns=T0 + int(period_ms * 1e6))


class Load:
    def __init__(self, sessions: int) -> None:
        self.sessions = sessions

    def __call__(self) -> int:
        return self.sessions


def _switch(sessions: int, slowdown=None, **kw) -> tuple[SpeculationSwitch, Load]:
    kw.setdefault("min_rounds", 1)
    load = Load(sessions)
    return SpeculationSwitch(LoadPolicy(TABLE), load, SwitchConfig(**kw), slowdown), load


def test_one_session_always_speculates():
    sw, _ = _switch(1)
    assert sw(None)
    for _ in range(20):  # however slow its drafter
        assert feed(sw, _spec(0, 500.0, 50.0), 600.0)
    assert sw.switches == 0


def test_nothing_measured_yet_means_speculate():
    """The first round (the drafter reads the whole prompt) is not measured, and a session
    needs min_rounds measured speculative rounds before it may turn speculation off."""
    sw, _ = _switch(16, min_rounds=3)
    assert sw(None)
    assert feed(sw, _spec(0, 900.0, 210.0, rnd=1), 1200.0)  # round 1: the Open
    assert sw.measured == 0
    assert feed(sw, _spec(1, 400.0, 210.0), 630.0) and feed(sw, _spec(1, 400.0, 210.0), 630.0)
    assert not feed(sw, _spec(1, 400.0, 210.0), 630.0)  # the third: enough to see it does not pay


def test_a_paying_drafter_keeps_speculating_under_load():
    # 4 sessions x 8 nodes: the forward is still flat; 3 tokens in 80 ms vs one in ~61 ms
    sw, _ = _switch(4)
    sw(None)
    assert all(feed(sw, _spec(2, 10.0, 60.0), 80.0) for _ in range(20))


def test_a_slow_drafter_under_load_turns_speculation_off_then_probes():
    # 16 sessions: the drafter is a queue (400 ms) and 16 x 8 nodes cost 210 ms: 2 tokens in
    # 630 ms, against one in 630 - 400 - 210 + t(16) = 75 ms plainly
    sw, _ = _switch(16, probe_every=4)
    sw(None)
    assert not feed(sw, _spec(1, 400.0, 210.0), 630.0)
    assert sw.switches == 1
    decisions = [feed(sw, _plain(60.0), 70.0) for _ in range(5)]
    assert decisions == [False, False, False, True, False]  # one probe after 4 plain rounds


def test_speculation_returns_when_it_pays_again():
    sw, load = _switch(16)
    sw(None)
    assert not feed(sw, _spec(2, 150.0, 210.0), 380.0)  # 3 / 380 ms vs 1 / 75 ms
    assert not feed(sw, _plain(60.0), 70.0)
    load.sessions = 2  # the others left: 2 x 8 tokens cost t(16) = 55 ms
    # predicted: 3 tokens in 70 - 60 + 150 + 55 = 215 ms, against one in 70 ms plainly
    assert not feed(sw, _plain(60.0), 70.0)
    sw.draft_ms.value = 20.0  # a faster drafter (measured on the last probe)
    assert feed(sw, _plain(60.0), 70.0)  # 3 tokens in 85 ms


def test_hysteresis_keeps_a_close_call_where_it_is():
    sw, _ = _switch(8, margin=0.5)
    sw(None)
    # 3 tokens in 170 ms; plain predicted at 170 - 120 - 52 + t(8) = 50 ms: faster, but not
    # by the margin
    assert feed(sw, _spec(2, 120.0, 52.0), 170.0)
    spec, plain = sw.rates(8)
    assert spec < plain < spec * 1.5
    assert sw.switches == 0


def test_fallback_rounds_say_nothing_about_speculation():
    sw, _ = _switch(16)
    sw(None)
    feed(sw, _spec(2, 20.0, 60.0), 90.0)
    before = (sw.tokens.value, sw.draft_ms.value, sw.spec_period.value)
    feed(sw, RoundStats(2, 1, 0, 2000.0, 60.0, fallback="no proposal within 2 s", start_ns=T0),
         2100.0)  # fmt: skip
    assert (sw.tokens.value, sw.draft_ms.value, sw.spec_period.value) == before


def test_a_slower_machine_makes_the_plain_prediction_slower():
    """c (the forwards' slowdown against the table) scales the predicted plain forward."""
    for c, want in ((1.0, False), (4.0, True)):
        sw, _ = _switch(8, slowdown=lambda c=c: c)
        sw(None)
        # 3 tokens in 210 ms vs plain 210 - 100 - 100 + c x 52 ms: plain pays at c = 1 only
        assert feed(sw, _spec(2, 100.0, 100.0), 210.0) is want


def test_slowdown_is_measured_against_the_table():
    p = LoadPolicy(TABLE)
    assert p.slowdown([]) == 1.0
    assert p.slowdown([(16, 0.110), (16, 0.110), (128, 0.210)]) == pytest.approx(2.0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="margin"):
        SwitchConfig(margin=-1)
    with pytest.raises(ValueError, match="probe_every"):
        SwitchConfig(probe_every=0)
    with pytest.raises(ValueError, match="min_rounds"):
        SwitchConfig(min_rounds=0)
