"""The batched forward's cost model and the load-adaptive tree budget (batching/costs.py):
the policy is pure and table-driven; the measurement runs on a tiny model; the drafter service
validates and applies the verifier's hint."""

import pytest

from coralline.batching import costs
from coralline.batching.costs import LoadPolicy, load_or_measure, measure
from coralline.batching.scheduler import BatchConfig, BatchScheduler
from coralline.draft.trees import CostModel, choose_budget
from coralline.rpc.drafter_server import _hint
from coralline.rpc.protos import drafter_pb2

from ..tiny import tiny_llama

# a forward that is flat (memory-bound) up to 32 tokens, then linear (compute-bound)
TABLE = {
    1: 50.0,
    2: 50.0,
    4: 51.0,
    8: 52.0,
    16: 55.0,
    32: 60.0,
    64: 110.0,
    128: 210.0,
    256: 410.0,
    512: 810.0,
}
VALUES = [0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.05, 0.04, 0.03]


def _budget(sessions: int) -> int:
    base = CostModel()  # the drafter's own single-session model
    hint = LoadPolicy(TABLE).hint(sessions, max_nodes=64)
    return choose_budget(VALUES, base.under_load(hint) if hint else base, max_nodes=64)


def test_trees_shrink_as_sessions_grow_and_speculation_turns_off():
    budgets = [_budget(s) for s in (2, 4, 8, 16, 32, 64, 128)]
    assert budgets == sorted(budgets, reverse=True), budgets
    assert budgets[0] >= 8  # two sessions: the forward is still flat, trees stay big
    assert _budget(1) > 1  # one session: the drafter's own model (another table) speculates
    assert budgets[-1] == 1  # 128 sessions, deep in the linear region: plain decoding


def test_policy_interpolates_extrapolates_and_stays_out_of_one_session():
    p = LoadPolicy(TABLE)
    assert p.hint(1, 64) is None  # one session: the drafter's own model
    assert p.cost(3) == pytest.approx(50.5)
    assert p.cost(1024) == pytest.approx(810 + 512 * (400 / 256))
    hint = p.hint(4, max_nodes=8)
    assert [n for n, _ in hint] == [1, 2, 3, 4, 6, 8]
    assert hint[-1][1] == pytest.approx(p.cost(32))
    with pytest.raises(ValueError, match="positive"):
        LoadPolicy({1: 0.0})


def test_cost_model_under_load_keeps_the_drafting_time_in_ms():
    base = CostModel(draft_cost=0.3, t1_ms=50.0)  # 15 ms of drafting
    loaded = base.under_load([(1, 100.0), (4, 150.0)])
    assert loaded.t1_ms == 100.0 and loaded.table == {1: 1.0, 4: 1.5}
    assert loaded.draft_cost * loaded.t1_ms == pytest.approx(15.0)
    assert base.under_load([]) is base


def test_measure_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CORALLINE_CACHE", str(tmp_path))
    sched = BatchScheduler(tiny_llama(20, seed=4), BatchConfig(slots=4, max_batch_tokens=32))
    table = measure(sched, context=16, repeats=1)
    assert list(table) == [t for t in costs.TOTALS if t <= 32]
    assert all(ms > 0 for ms in table.values())
    assert sched.pool.free_slots == 4  # the pool is as it was
    first = load_or_measure(sched, "f" * 64)
    assert costs.cache_file(sched.model, "f" * 64, cpu_kernel=sched.cpu_kernel).exists()
    # a scheduler without fused projections has its own table (its forward costs differ), and
    # so does one whose decode attention runs on the CPU kernel (cpu_attention.py)
    assert costs.cache_file(sched.model, "f" * 64, fused=False) != costs.cache_file(
        sched.model, "f" * 64
    )
    assert costs.cache_file(sched.model, "f" * 64, cpu_kernel=True) != costs.cache_file(
        sched.model, "f" * 64
    )
    # the linear layers' kind and their pack's layout name the table too (cpu_linear.py)
    from coralline.cpu_linear import cpu_linears

    onednn = cpu_linears(tiny_llama(20, seed=4), "onednn")
    assert "-OneDnnLinear-blocked-" in costs.cache_file(onednn, "f" * 64).name
    assert "-Linear-" in costs.cache_file(sched.model, "f" * 64).name
    probed = []

    def probe_only(scheduler, totals=costs.TOTALS, **kw):  # the machine as fast as the cache
        if totals == costs.TOTALS:
            pytest.fail("measured again")
        probed.append(totals)
        return {t: first[t] * 1.2 for t in totals}

    monkeypatch.setattr(costs, "measure", probe_only)
    assert load_or_measure(sched, "f" * 64) == first  # read from the cache, after a probe
    assert probed == [costs.PROBE]


def test_a_cached_table_the_machine_no_longer_matches_is_measured_again(
    tmp_path, monkeypatch, caplog
):
    """A table cached while the machine was busy (every figure far too slow) is found out by
    the start-up probe, measured again and replaced; a warning says so."""
    import json
    import logging

    monkeypatch.setenv("CORALLINE_CACHE", str(tmp_path))
    sched = BatchScheduler(tiny_llama(20, seed=4), BatchConfig(slots=4, max_batch_tokens=32))
    path = costs.cache_file(sched.model, "d" * 64, cpu_kernel=sched.cpu_kernel)
    path.parent.mkdir(parents=True)
    slow = {t: 1e4 for t in costs.TOTALS if t <= 32}  # 10 s per forward: a tiny model never is
    path.write_text(json.dumps({"ms": slow, "measured": 0}))
    log = logging.getLogger("test-costs")
    with caplog.at_level(logging.WARNING, "test-costs"):
        table = load_or_measure(sched, "d" * 64, log=log)
    assert "off on this machine now" in caplog.text and "1 tokens" in caplog.text
    assert list(table) == list(slow) and max(table.values()) < 1e3
    assert json.loads(path.read_text())["ms"] == {str(t): ms for t, ms in table.items()}
    assert costs._drift({1: 10.0, 16: 20.0}, {1: 14.0, 16: 9.0}) == {16: 0.45}


def test_an_unwritable_cache_measures_and_warns(tmp_path, monkeypatch, caplog):
    import logging

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the cache root is a file: no directory can be made under it
    monkeypatch.setenv("CORALLINE_CACHE", str(blocker))
    sched = BatchScheduler(tiny_llama(20, seed=4), BatchConfig(slots=4, max_batch_tokens=8))
    log = logging.getLogger("test-costs")
    with caplog.at_level(logging.WARNING, "test-costs"):
        table = load_or_measure(sched, "e" * 64, log=log)
    assert list(table) == [t for t in costs.TOTALS if t <= 8]
    assert "could not cache the cost table" in caplog.text


def test_the_drafter_service_validates_the_hint():
    msg = drafter_pb2.Commit()
    assert _hint(msg) is None
    msg.cost.nodes[:] = [1, 4]
    msg.cost.ms[:] = [10.0, 12.0]
    assert _hint(msg) == [(1, 10.0), (4, 12.0)]
    for nodes, ms, err in [
        ([1, 4], [10.0], "as many ms"),
        ([4, 1], [10.0, 12.0], "ascending"),
        ([0, 1], [10.0, 12.0], ">= 1"),
        ([1, 2], [10.0, float("nan")], "positive and finite"),
        ([1, 2], [10.0, -1.0], "positive and finite"),
    ]:
        bad = drafter_pb2.Commit()
        bad.cost.nodes[:] = nodes
        bad.cost.ms[:] = ms
        with pytest.raises(ValueError, match=err):
            _hint(bad)
