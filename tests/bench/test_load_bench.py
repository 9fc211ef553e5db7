"""The load bench's machinery on a tiny model (the real run, with SmolLM2, the services, the
stack and the vLLM peer, is `coralline bench load` in `make bench`): the closed loop, the
engine's batched plain decoding under it, output agreement, the report files."""

import json

import pytest

from coralline.bench import load as lb
from coralline.target import TargetRunner

from ..tiny import tiny_llama


def test_closed_loop_serves_every_request_with_c_in_flight():
    import threading
    import time

    from coralline.bench.vllm_peer import Request

    live, peak, lock = [0], [0], threading.Lock()

    def serve(i, ids):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        r = Request(index=i, start=time.perf_counter())
        for t in ids:
            time.sleep(0.002)
            r.token_ids.append(t)
            r.token_times.append(time.perf_counter())
        with lock:
            live[0] -= 1
        return lb._Served(r, 2.0)

    prompts = [[1, 2, 3], [4, 5], [6]]
    pt = lb.closed_loop(4, prompts, serve)
    assert pt["requests"] == 4 and peak[0] <= 4  # max(prompts, c) requests, c at a time
    assert pt["outputs"] == prompts  # request i served prompt i % 3, reported in prompt order
    assert pt["tokens"] == 3 + 2 + 1 + 3 and pt["acceptance_length"] == 2.0
    assert pt["itl_p50_ms"] > 0 and pt["aggregate_tok_s"] > 0


def test_engine_plain_batched_on_a_tiny_model_and_the_report(tmp_path):
    runner = TargetRunner(tiny_llama(30, seed=2), None)
    cfg = lb.LoadBenchConfig(
        prompts=3, max_new_tokens=6, concurrency=(1, 3), methods=("engine-plain",)
    )
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    res = lb._engine_plain(cfg, prompts, runner)
    assert [p["concurrency"] for p in res["points"]] == [1, 3]
    assert res["points"][0]["outputs"] == res["points"][1]["outputs"]  # batching changes nothing
    assert all(len(o) == 6 for o in res["points"][0]["outputs"])
    other = json.loads(json.dumps(res))
    other["method"] = "hf-batched"
    other["points"][0]["outputs"][0] = [0] * 6  # one disagreement
    results = [res, other]
    lb._agreement(results, 6)
    # every point of engine-plain is compared with the reference's first: 2 of 6 differ
    assert res["agrees_with"] == {"reference": "hf-batched", "same": 4, "outputs": 6}
    report = {
        "bench": "load",
        "date": "2026-12-01",
        "command": "coralline bench load",
        "machine": {"cpu": "test", "threads": 2},
        "config": {"prompts": 3, "max_new_tokens": 6},
        "results": results,
        "notes": ["vllm skipped: run make bench-peers"],
    }
    md = lb.markdown(report, "load.png")
    assert "| engine-plain | 3 |" in md and "4/6 outputs equal hf-batched's" in md
    paths = lb.write(report, tmp_path / "load.json")
    assert [p.name for p in paths] == ["load.json", "load.md", "load.png"]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_passes_alternate_the_order_and_report_medians_on_smollm2():
    """repeats=3 on the real target, two in-process methods: passes run A B, B A, A B; each
    point's figure is the median of its three passes, listed beside it; outputs agree."""
    cfg = lb.LoadBenchConfig.quick(methods=("hf-batched", "engine-plain"), repeats=3)
    report = lb.run(cfg)
    assert report["pass_orders"] == [
        ["hf-batched", "engine-plain"],
        ["engine-plain", "hf-batched"],
        ["hf-batched", "engine-plain"],
    ]
    assert [r["method"] for r in report["results"]] == ["hf-batched", "engine-plain"]
    for res in report["results"]:
        assert res["passes"] == 3 and [p["concurrency"] for p in res["points"]] == [1, 2]
        for pt in res["points"]:
            runs = pt["aggregate_tok_s_passes"]
            assert len(runs) == 3 and pt["aggregate_tok_s"] == sorted(runs)[1]
            assert pt["outputs_stable"] and pt["tokens"] == 2 * 8
        assert res["agrees_with"]["same"] == res["agrees_with"]["outputs"] == 4
    md = lb.markdown(report)
    assert "- engine-plain: medians of 3 passes (alternating order)" in md


def test_one_pass_is_reported_as_it_ran():
    run = {"method": "m", "points": [{"concurrency": 1, "aggregate_tok_s": 5.0}]}
    assert lb.merge_passes([run]) is run


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown methods"):
        lb.LoadBenchConfig(methods=("tgi",))
    with pytest.raises(ValueError, match=">= 1"):
        lb.LoadBenchConfig(concurrency=(0, 2))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        lb.LoadBenchConfig(repeats=0)
    assert lb.LoadBenchConfig.quick().concurrency == (1, 2)


def test_the_speculation_cache_figures_come_from_the_drafters_metrics():
    from prometheus_client import generate_latest

    from coralline.telemetry.metrics import DrafterMetrics

    m = DrafterMetrics()
    assert lb.cache_counts(generate_latest(m.registry).decode()) == {
        "hit": 0.0, "miss": 0.0, "hidden_s": 0.0, "hit_rate": None,
    }  # fmt: skip
    m.spec_cache.labels(outcome="hit").inc(3)
    m.spec_cache.labels(outcome="miss").inc(1)
    m.spec_hidden_s.inc(0.25)
    got = lb.cache_counts(generate_latest(m.registry).decode())
    assert got == {"hit": 3.0, "miss": 1.0, "hidden_s": 0.25, "hit_rate": 0.75}


def test_the_pipelined_method_is_known_and_reported():
    assert "verifier-coral-pipelined" in lb.METHODS
    report = {
        "config": {"prompts": 1, "max_new_tokens": 4},
        "machine": {},
        "date": "d",
        "results": [
            {
                "method": "verifier-coral-pipelined",
                "points": [],
                "speculation_cache": {"hit": 3, "miss": 1, "hit_rate": 0.75, "hidden_s": 0.25},
            }
        ],
        "notes": [],
    }
    assert "3 hits, 1 misses (hit rate 0.75), 0.2 s of drafting hidden" in lb.markdown(report)
