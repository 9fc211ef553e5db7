"""The speculation switch (batching/switch.py): a session decodes plainly, without asking the
drafter, while speculation is predicted slower at the current load; it asks the drafter again
when the load drops or to re-measure. Pure: the rounds' statistics are given."""

import pytest

from coralline.batching.costs import LoadPolicy
from coralline.batching.switch import SpeculationSwitch, SwitchConfig
from coralline.engine import RoundStats

from .test_costs import TABLE  # flat up to 32 tokens, then linear


def _spec(accepted: int, draft_ms: float, verify_ms: float, nodes: int = 8) -> RoundStats:
    # the forward is all of verify_ms but 5 ms (acceptance and commit)
    return RoundStats(2, nodes, accepted, draft_ms, verify_ms, forward_ms=verify_ms - 5.0)


def _plain(ms: float) -> RoundStats:
    return RoundStats(2, 1, 0, 0.0, ms, plain=True)


class Load:
    def __init__(self, sessions: int) -> None:
        self.sessions = sessions

    def __call__(self) -> int:
        return self.sessions


def _switch(sessions: int, **kw) -> tuple[SpeculationSwitch, Load]:
    kw.setdefault("min_rounds", 1)
    load = Load(sessions)
    return SpeculationSwitch(LoadPolicy(TABLE), load, SwitchConfig(**kw)), load


def test_one_session_always_speculates():
    sw, _ = _switch(1)
    assert sw(None)
    for _ in range(20):  # however slow its drafter
        assert sw(_spec(0, 500.0, 50.0))
    assert sw.switches == 0


def test_nothing_measured_yet_means_speculate():
    """The first round (the drafter reads the whole prompt) is not measured, and a session
    needs min_rounds measured speculative rounds before it may turn speculation off."""
    sw, _ = _switch(16, min_rounds=3)
    assert sw(None)
    assert sw(RoundStats(1, 8, 0, 900.0, 210.0))  # round 1: the Open
    assert sw.measured == 0
    assert sw(_spec(1, 400.0, 210.0)) and sw(_spec(1, 400.0, 210.0))
    assert not sw(_spec(1, 400.0, 210.0))  # the third: enough to see it does not pay


def test_a_paying_drafter_keeps_speculating_under_load():
    # 4 sessions x 8 nodes = 32 tokens: the forward is still flat (60 ms vs 50 for plain);
    # tau 3 in 10 + 60 ms beats one token per ~50 ms
    sw, _ = _switch(4)
    sw(None)
    assert all(sw(_spec(2, 10.0, 60.0)) for _ in range(20))


def test_a_slow_drafter_under_load_turns_speculation_off_then_probes():
    # 16 sessions: the drafter is a queue (400 ms), trees push the forward to 16 x 8 = 128
    # tokens (210 ms vs 55 ms for 16 plain tokens): 2 tokens in 610 ms < 1 token in ~60 ms
    sw, _ = _switch(16, probe_every=4)
    sw(None)
    assert not sw(_spec(1, 400.0, 210.0, nodes=8))
    assert sw.switches == 1
    decisions = [sw(_plain(60.0)) for _ in range(5)]
    assert decisions == [False, False, False, True, False]  # one probe after 4 plain rounds


def test_speculation_returns_when_the_load_drops():
    sw, load = _switch(16)
    sw(None)
    assert not sw(_spec(2, 150.0, 210.0))
    assert not sw(_plain(60.0))
    load.sessions = 2  # the others left: 2 x 8 tokens cost what 2 plain tokens cost
    # predicted: plain 60 ms a token; speculation 150 + 60 x t(16)/t(2) = 216 ms for tau 3
    assert not sw(_plain(60.0))  # 3 / 216 < 1 / 60: the drafter is still too slow
    sw.draft_ms.value = 20.0  # a faster drafter (measured on the last probe)
    assert sw(_plain(60.0))  # 3 / 86 > 1.1 / 60


def test_hysteresis_keeps_a_close_call_where_it_is():
    sw, _ = _switch(8, margin=0.5)
    sw(None)
    assert sw(_spec(2, 120.0, 60.0))  # 3 tokens in 180 ms; plain predicted at 5 + 52 ms
    spec, plain = sw.rates(8)
    assert spec < plain < spec * 1.5  # plain predicted faster, but not by the margin
    assert sw.switches == 0


def test_fallback_rounds_say_nothing_about_speculation():
    sw, _ = _switch(16)
    sw(None)
    sw(_spec(2, 20.0, 60.0))
    before = (sw.tokens.value, sw.draft_ms.value)
    sw(RoundStats(2, 1, 0, 2000.0, 60.0, fallback="no proposal within 2 s"))
    assert (sw.tokens.value, sw.draft_ms.value) == before


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="margin"):
        SwitchConfig(margin=-1)
    with pytest.raises(ValueError, match="probe_every"):
        SwitchConfig(probe_every=0)


def test_a_slower_machine_makes_the_plain_prediction_slower():
    """c (the forwards' slowdown against the table) scales the predicted plain forward."""
    for c, want in ((1.0, False), (4.0, True)):
        load = Load(8)
        sw = SpeculationSwitch(LoadPolicy(TABLE), load, SwitchConfig(min_rounds=1), lambda c=c: c)
        sw(None)
        # 3 tokens in 200 ms vs plain 5 + c x 52 ms: plain pays at c = 1, not at c = 4
        assert sw(_spec(2, 100.0, 100.0)) is want


def test_slowdown_is_measured_against_the_table():
    p = LoadPolicy(TABLE)
    assert p.slowdown([]) == 1.0
    assert p.slowdown([(16, 0.110), (16, 0.110), (128, 0.210)]) == pytest.approx(2.0)
