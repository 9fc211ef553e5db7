"""`coralline reliability --quick` (the CI subset): the real stack on SmolLM2 (2 drafters, 2
verifiers, 2 Ray Serve router replicas, a Redis of its own), fuzzed through every API, broken
under load (SIGKILL of a verifier, a drafter and a router replica, Redis killed and restarted,
latency and jitter on a drafter link) and soaked; the report's verdict must pass and its
markdown must say so. `make reliability` runs the full-size version (2000 messages per API,
16 clients for 120 s)."""

import json

import pytest

from coralline.reliability.run import ReliabilityConfig, markdown, run, save


@pytest.mark.slow
def test_the_quick_reliability_run_passes(tmp_path):
    report = run(ReliabilityConfig.quick(), command="coralline reliability --quick")
    json_path, md_path = save(report, tmp_path)
    checks = report["verdict"]["checks"]
    assert report["verdict"]["passed"], {k: v for k, v in checks.items() if not v}
    fz = report["fuzz"]
    for api in ("public", "verifier", "drafter"):
        assert fz[api]["messages"] >= 100 and fz[api]["unexpected"] == 0
    assert fz["proposals"]["proposals"] >= 100
    faults = report["faults"]
    assert set(faults) == {
        "verifier SIGKILL",
        "drafter SIGKILL",
        "router replica SIGKILL",
        "redis killed and restarted",
        "drafter link +20 ms, jitter 30 ms",
    }
    for name, res in faults.items():
        assert res["completed"] > 0, name
        assert res["tokens_lost"] == res["tokens_duplicated"] == res["outputs_differing"] == 0
    soak = report["soak"]
    assert soak["error_rate"] == 0 and soak["completed"] > 0
    assert json.loads(json_path.read_text())["verdict"]["passed"]
    assert md_path.read_text() == markdown(report)
    assert "Verdict: **passed**" in md_path.read_text()
