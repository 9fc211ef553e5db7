"""`coralline bench router`: the config checks, and the quick bench end to end (real drafter and
verifier processes, real SmolLM2, Ray + Serve on loopback twice: the front, then Serve's gRPC
proxy). Asserts on the structure and sanity of the results, never on speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from coralline.bench import router as router_bench


def test_config_validation_and_quick_preset():
    q = router_bench.RouterBenchConfig.quick()
    assert (q.prompts, q.max_new_tokens, q.repeats, q.clients, q.cancel_trials) == (
        2, 24, 1, (1, 2), 2,
    )  # fmt: skip
    assert q.requests == 2
    full = router_bench.RouterBenchConfig()
    assert full.clients == (1, 2, 4, 8) and full.requests == 8 and full.cancel_trials == 6
    with pytest.raises(ValueError, match="same work"):
        router_bench.RouterBenchConfig(clients=(1, 3), requests_per_level=4)
    with pytest.raises(ValueError, match="drafter"):
        router_bench.RouterBenchConfig(drafter="none")
    with pytest.raises(ValueError, match=">= 1"):
        router_bench.RouterBenchConfig(prompts=0)
    with pytest.raises(ValueError, match="clients"):
        router_bench.RouterBenchConfig(clients=())


def test_percentiles():
    assert router_bench._pct([3.0], 90) == 3.0
    assert router_bench._pct([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert router_bench._pct([0.0, 10.0], 90) == pytest.approx(9.0)
    d = router_bench._dist_ms([0.001, 0.002, 0.003])
    assert d["n"] == 3 and d["p50"] == pytest.approx(2.0) and d["max"] == pytest.approx(3.0)
    assert router_bench._dist_ms([]) is None


def _numbers(obj, path: str = ""):
    """Every number in a JSON tree, with where it is (bools are not numbers here)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, obj


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_quick_router_bench_end_to_end(tmp_path):
    out = tmp_path / "router.json"
    router_bench.main(str(out), quick=True, command="coralline bench router --quick")
    rep = json.loads(out.read_text())
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    assert md.is_file() and png.is_file() and png.stat().st_size > 1000
    text = md.read_text()
    assert "Overhead per token" in text and "Cancellation" in text and "router.png" in text

    # machine, versions, settings
    m = rep["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["ray"] and m["grpcio"] and rep["date"]
    assert rep["settings"]["prompts"] == 2 and rep["settings"]["clients"] == [1, 2]

    # greedy: the same tokens on every path, sequential and concurrent
    assert rep["identical"]["per_prompt"] == [True, True]
    assert rep["identical"]["concurrent"] is True and rep["identical"]["all"] is True

    # every number is finite; the measured ones positive
    for where, v in _numbers(rep):
        assert math.isfinite(v), where
    for path in router_bench.PATHS:
        assert rep["ms_per_token"][path] > 0
        assert rep["first_chunk_ms"][path]["p50"] > 0
    for ingress in router_bench.INGRESSES:
        o = rep["overhead"][ingress]
        assert o["ratio"] > 0 and o["after_first_chunk_ratio"] > 0
        for stats in o["paths"].values():
            assert stats["tokens"] > 0 and stats["seconds"] > 0
            assert stats["ms_per_token"] > 0 and stats["after_first_chunk_ms_per_token"] > 0
        assert len(o["per_prompt"]) == 2
    assert set(rep["within_5_percent"]) == {"front", "proxy"}

    levels = rep["concurrency"]["levels"]
    assert [lv["clients"] for lv in levels] == [1, 2]
    tokens = {lv["tokens"] for lv in levels}
    assert len(tokens) == 1 and tokens.pop() > 0  # the same work at every level
    for lv in levels:
        assert lv["requests"] == 2 and lv["tokens_per_second"] > 0
        assert lv["latency_ms"]["p50"] > 0 and lv["first_chunk_ms"]["p50"] > 0

    # cancellation: results for both ingresses (and the direct floor), whatever they say
    c = rep["cancellation"]
    assert set(c) == {"direct", "front", "proxy"}
    assert set(c["direct"]) == {"client_cancel"}
    for ingress in router_bench.INGRESSES:
        assert set(c[ingress]) == {"client_cancel", "cancel_session"}
    for path, ways in c.items():
        for label, r in ways.items():
            assert r["trials"] == 2 and len(r["per_trial"]) == 2, (path, label)
            assert 0 <= r["freed_fraction"] <= 1
            for t in r["per_trial"]:
                assert t["session_id"] and t["running_at_cancel"], (path, label)
                assert t["first_chunk_ms"] > 0 and t["call_ms"] >= 0
                assert t["freed"] == (t["freed_ms"] is not None and t["final_state"] != "finished")
                if not t["freed"]:  # stopped afterwards, so the next trial started clean
                    assert t["cleanup"] and t["cleanup"]["freed_ms"] is not None
    assert "front" in rep["cancellation_evidence"] and "proxy" in rep["cancellation_evidence"]
    assert Path(out).stat().st_size < 200_000

    # the HTTP API against the gRPC API through the same front
    h = rep["http"]
    assert h["identical_text"] == [True, True] and h["usage_equals_grpc_tokens"] == [True, True]
    for path in ("grpc", "http"):
        s = h["paths"][path]
        assert s["generations"] == 2 and s["tokens"] > 0 and s["tokens_per_second"] > 0
        assert s["first_chunk_ms"]["p50"] > 0
    assert h["paths"]["http"]["tokens"] == h["paths"]["grpc"]["tokens"]
    assert h["ms_per_token_ratio"] > 0 and h["first_chunk_p50_ratio"] > 0
    d = h["disconnect"]
    assert d["trials"] == len(d["per_trial"]) == 2
    for t in d["per_trial"]:
        assert t["session_id"] and t["running_at_disconnect"]
        assert t["freed"] == (t["freed_ms"] is not None)
    assert "HTTP API against the gRPC API" in text
