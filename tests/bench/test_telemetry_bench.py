"""The telemetry bench's report from synthetic runs (the real run starts four processes: `make
bench`); its arithmetic, its output-identity check and its files."""

from __future__ import annotations

import json

import pytest

from coralline.bench import telemetry as tb
from coralline.telemetry.live import SpanStore


def _runs(on_seconds, off_seconds, same=True):
    runs = {"on": [], "off": []}
    for i, (a, b) in enumerate(zip(on_seconds, off_seconds, strict=True)):
        runs["on"].append({"prompt": i, "rep": 0, "tokens": [1] * 10, "seconds": a, "rounds": 4})
        other = [1] * 10 if same else [2] * 10
        runs["off"].append({"prompt": i, "rep": 0, "tokens": other, "seconds": b, "rounds": 4})
    return runs


def test_report_cost_ratios_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr("coralline.bench.pipeline._machine", lambda: {"cpu": "test"})
    cfg = tb.TelemetryBenchConfig.quick()
    runs = _runs([1.0, 2.0, 1.1], [1.0, 1.0, 1.0])
    report = tb._report(cfg, "cmd", [("s", "p")] * 3, runs, SpanStore(), 96, 5)
    assert report["tokens_per_second"] == {"on": round(30 / 4.1, 3), "off": 10.0}
    assert report["cost_percent"] == round(100 * (1 - (30 / 4.1) / 10.0), 2)
    assert report["prompt_ratios"] == [1.0, 0.5, round(1 / 1.1, 4)]
    assert report["median_prompt_ratio"] == round(1 / 1.1, 4)
    assert report["identical_outputs"] is True
    assert report["spans_per_round"] == 8.0
    md = tb.markdown(report, "t.png")
    assert "| off (default) | 10.00 |" in md and "Identical tokens on and off: yes" in md
    png = tb.plot(report, tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    json.dumps(report)  # the JSON report is serialisable


def test_report_flags_different_outputs(monkeypatch):
    monkeypatch.setattr("coralline.bench.pipeline._machine", lambda: {})
    runs = _runs([1.0], [1.0], same=False)
    report = tb._report(tb.TelemetryBenchConfig.quick(), "", [("s", "p")], runs, SpanStore(), 0, 0)
    assert report["identical_outputs"] is False
    assert "Identical tokens on and off: NO" in tb.markdown(report)


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match=">= 1"):
        tb.TelemetryBenchConfig(prompts=0)
