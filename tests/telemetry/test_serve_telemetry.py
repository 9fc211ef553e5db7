"""Telemetry of a real `coralline serve` run (the CLI in its own process: a drafter, a verifier,
a Ray Serve router, the front, SmolLM2), seen the way operators see it:
  - OTLP/gRPC: serve (whose services export to its own OTLP/HTTP receiver) forwards every span
    to the collector named by OTEL_EXPORTER_OTLP_ENDPOINT (here an OTLP/gRPC receiver in the test
    process); one request = one trace with spans of the
    router, the verifier and the drafter, one verifier.round span per round, each drafter.round
    the child of its verifier.round;
  - Prometheus: every service's /metrics over HTTP, then a real Prometheus server discovering
    them through serve's HTTP SD endpoint and answering every dashboard panel's query;
  - the live view in headless Chromium: a generation made during the test appears with a
    timeline across three services, and the console stays clean;
  - `coralline trace-report` on the file serve appended the spans to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from coralline.client import Client
from coralline.rpc.process import die_with_parent_env
from coralline.telemetry import tracing as tr
from coralline.telemetry.receiver import OtlpReceiver

from ..browser import chromium, console_errors
from ..prometheus_server import own_prometheus
from .dashboards import every_promql, unanswered

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Serve:
    address: str
    url: str  # the live view, "http://127.0.0.1:PORT/"
    trace_file: Path
    proc: subprocess.Popen


class Collector:
    """The test's OTLP/gRPC receiver: what a user's collector would get. It starts only after
    serve is launched: a gRPC server's threads in a process that forks can kill the child
    before exec (telemetry/receiver.py)."""

    def __init__(self) -> None:
        self.spans: list = []
        self.lock = threading.Lock()
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.receiver = OtlpReceiver(self.add, port=self.port, transport="grpc")

    def add(self, spans) -> None:
        with self.lock:
            self.spans.extend(spans)

    def trace_of(self, session_id: str) -> list:
        with self.lock:
            spans = list(self.spans)
        ids = {s.trace_id for s in spans if s.attributes.get("specdec.session_id") == session_id}
        return [s for s in spans if s.trace_id in ids]


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.receiver.stop()


@pytest.fixture(scope="module")
def serve(collector, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-telemetry")
    port, dashboard = _free_port(), _free_port()
    trace_file = tmp / "spans.jsonl"
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, **die_with_parent_env())
    cmd = [sys.executable, "-m", "coralline.cli", "serve", "--port", str(port)]
    cmd += ["--dashboard-port", str(dashboard), "--trace-file", str(trace_file)]
    cmd += ["--log-dir", str(tmp / "logs")]
    with open(tmp / "serve.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    collector.receiver.start()  # after the fork (serve forwards only once requests flow)
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if "spans appended to" in line:  # the last line serve prints once it is up
            break
    out = "\n".join(lines)
    if "live view" not in out:
        proc.kill()
        pytest.fail(f"coralline serve did not come up:\n{out}\n{(tmp / 'serve.err').read_text()}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    yield Serve(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}/", trace_file, proc)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("coralline serve did not stop within 90 s of Ctrl-C")


def _generate(serve: Serve, prompt: str, **kw):
    with Client(serve.address) as client:
        return client.generate(prompt, **kw)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.3)


def test_one_request_is_one_trace_across_three_services_over_otlp(serve, collector):
    result = _generate(serve, "Name three colours.", max_new_tokens=24, temperature=0)
    sid, rounds = result.session_id, result.summary.rounds

    def complete():
        spans = collector.trace_of(sid)
        names = [s.name for s in spans]
        if names.count(tr.VERIFIER_ROUND) < rounds or tr.DRAFTER_ROUND not in names:
            return None
        if not any(s.name.startswith("chat ") for s in spans):
            return None
        return spans

    spans = _wait(complete, 20, f"the spans of session {sid} at the OTLP collector")
    assert len({s.trace_id for s in spans}) == 1
    assert {s.service for s in spans} >= set(tr.SERVICES.values())
    by_id = {s.span_id: s for s in spans}
    root = next(s for s in spans if s.name == "chat smollm2-135m-instruct")
    assert root.kind == "SERVER" and root.parent_id == ""
    assert root.attributes["gen_ai.request.model"] == "smollm2-135m-instruct"
    assert root.attributes["gen_ai.usage.output_tokens"] == result.summary.tokens
    assert root.attributes["gen_ai.request.temperature"] == 0.0
    client = next(s for s in spans if s.name == tr.VERIFIER_RPC and s.kind == "CLIENT")
    server = next(s for s in spans if s.name == tr.VERIFIER_RPC and s.kind == "SERVER")
    assert client.parent_id == root.span_id and server.parent_id == client.span_id
    assert server.service == tr.SERVICES["verifier"]
    round_spans = [s for s in spans if s.name == tr.VERIFIER_ROUND]
    assert len(round_spans) == rounds
    assert all(s.parent_id == server.span_id for s in round_spans)
    assert sorted(s.attributes["specdec.round"] for s in round_spans) == list(range(1, rounds + 1))
    committed = sum(s.attributes["specdec.committed"] for s in round_spans)
    assert committed == result.summary.tokens
    for s in round_spans:  # the hops of each round are its children
        kids = {k.name for k in spans if k.parent_id == s.span_id}
        assert {tr.DRAFT_WAIT, tr.TARGET_FORWARD, tr.VERIFY, tr.KV_COMMIT} <= kids, kids
    drafts = [s for s in spans if s.name == tr.DRAFTER_ROUND]
    assert drafts and all(s.service == tr.SERVICES["drafter"] for s in drafts)
    for d in drafts:  # the context crossed the bidirectional stream in each round's message
        parent = by_id[d.parent_id]
        assert parent.name == tr.VERIFIER_ROUND
        assert parent.attributes["specdec.round"] == d.attributes["specdec.round"]


def test_every_service_serves_metrics_over_http(serve):
    _generate(serve, "Say hello.", max_new_tokens=12, temperature=0)
    groups = json.loads(_get(serve.url + "prometheus/targets"))
    services = {g["labels"]["service"]: g["targets"][0] for g in groups}
    assert set(services) == {"router", "verifier", "drafter"}
    expect = {
        "router": "coralline:router_generation_tokens_total",
        "verifier": "coralline:rounds_total",
        "drafter": "coralline:drafter_proposals_total",
    }
    for service, target in services.items():
        assert target.startswith("127.0.0.1:")
        text = _get(f"http://{target}/metrics").decode()
        values = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(expect[service] + " ")
        ]
        assert values and values[0] > 0, f"{service}: {expect[service]} missing or zero"


def test_every_dashboard_query_answers_from_a_real_serve(serve, tmp_path):
    stop = threading.Event()
    failures: list[BaseException] = []

    def traffic() -> None:  # requests flow while Prometheus scrapes
        prompts = ["Count to five.", "Name a fruit.", "What is 2 + 2?", "Greet me."]
        n = 0
        with Client(serve.address) as client:
            while not stop.is_set():
                try:
                    client.generate(prompts[n % 4], max_new_tokens=16, temperature=0.7, seed=n)
                except Exception as e:
                    failures.append(e)
                    return
                n += 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        with own_prometheus(tmp_path, http_sd_url=serve.url + "prometheus/targets") as prom:
            prom.wait_for('up{service="verifier"} == 1', timeout=30)
            missing = unanswered(prom.query, every_promql(rate_interval="1m"), timeout=60)
            targets = prom.target_summary()
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing) + "\n" + targets


def test_live_view_shows_a_generation_across_three_services(serve):
    result = _generate(serve, "Write one short sentence about rain.", max_new_tokens=20)

    def trace_id():
        traces = json.loads(_get(serve.url + "api/traces?limit=200"))["traces"]
        hit = [t for t in traces if t.get("session_id") == result.session_id]
        return hit[0]["trace_id"] if hit and len(hit[0]["services"]) >= 3 else None

    tid = _wait(trace_id, 20, "the generation in the live view's API")
    with chromium() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(serve.url)
        row = WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.CSS_SELECTOR, f'tr.request[data-trace-id="{tid}"]')
        )
        row.click()

        def lanes(d):
            bars = d.find_elements(By.CSS_SELECTOR, "#timeline rect.span")
            return {b.get_attribute("data-service") for b in bars} >= set(tr.SERVICES.values())

        WebDriverWait(driver, 20).until(lanes)
        names = {
            b.get_attribute("data-name")
            for b in driver.find_elements(By.CSS_SELECTOR, "#timeline rect.span")
        }
        assert tr.VERIFIER_ROUND in names and tr.DRAFTER_ROUND in names
        assert not console_errors(driver)


def test_trace_report_reads_the_spans_serve_appended(serve, tmp_path):
    result = _generate(serve, "List two animals.", max_new_tokens=16, temperature=0)
    sid = result.session_id

    def written():
        text = serve.trace_file.read_text() if serve.trace_file.exists() else ""
        return sid in text and tr.DRAFTER_ROUND in text

    _wait(written, 20, "the spans in serve's --trace-file")
    time.sleep(1.0)  # the last batches of the other services
    png = tmp_path / "timeline.png"
    cmd = [sys.executable, "-m", "coralline.cli", "trace-report", str(serve.trace_file)]
    out = subprocess.run(
        [*cmd, "--json", "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    mine = [r for r in report["requests"] if r["session_id"] == sid]
    assert len(mine) == 1 and mine[0]["rounds"] == result.summary.rounds
    rows = [r for r in report["rounds"] if r["trace_id"] == mine[0]["trace_id"]]
    assert len(rows) == result.summary.rounds
    # round 1's forward is the prompt's (the verifier.prefill span): the others have their own
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["forward_ms"] == 0 and mine[0]["prefill_ms"] > 0
    assert all(r["forward_ms"] > 0 and r["wait_ms"] is not None for r in rows[1:])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
