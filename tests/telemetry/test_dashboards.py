"""The Grafana dashboards (helm/coralline/dashboards) and the example Grafana / Prometheus
configurations (helm/coralline/examples): well-formed, naming only metrics the services
export, and every panel's PromQL answered by a real Prometheus scraping real coralline
registries fed with synthetic rounds."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import yaml

from coralline.batching.measured import MeasuredSwitch
from coralline.telemetry.metrics import (
    DrafterMetrics,
    RouterMetrics,
    VerifierMetrics,
    serve_metrics,
)

from ..prometheus_server import own_prometheus
from .dashboards import (
    EXAMPLES,
    all_panels,
    datasource_examples,
    datasource_kind,
    every_promql,
    load_dashboards,
    metric_names,
    panel_queries,
    prometheus_queries,
    series_names,
    substitute,
    traces_to_metrics_queries,
    unanswered,
)

DASHBOARDS = load_dashboards()
PANEL_TYPES = {"timeseries", "stat", "table", "row"}
SD_URL = "http://127.0.0.1:8321/prometheus/targets"
# What Prometheus 2.x sends when it scrapes (OpenMetrics first; scrape.go's scrapeAcceptHeader)
PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
ESCAPED_NAMES = (
    "prometheus_client's OpenMetrics encoder turns `coralline:` into `coralline_` in sample "
    "lines (not in # TYPE lines) when a scraper asks for OpenMetrics without "
    "escaping=allow-utf-8, as Prometheus 2.x does (prometheus/client_python#1177): "
    "serve_metrics must answer in the 0.0.4 text format (e.g. drop the Accept header "
    "before prometheus_client sees it)"
)


def exported() -> tuple[set[str], set[str]]:
    """(metric families, series names) of a fresh VerifierMetrics, DrafterMetrics and
    RouterMetrics registry: the names Prometheus will store."""
    families: set[str] = set()
    series: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for metrics in (VerifierMetrics(), DrafterMetrics(), RouterMetrics()):
        for family in metrics.registry.collect():
            families.add(family.name)
            series.update(family.name + s for s in suffixes[family.type])
    return families, series


# ---------------------------------------------------------------------------------- static


def test_there_are_the_two_dashboards() -> None:
    assert set(DASHBOARDS) == {"coralline-latency.json", "coralline-overview.json"}
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert sorted(uids) == ["coralline-latency", "coralline-overview"]


@pytest.mark.parametrize("file", sorted(DASHBOARDS))
def test_dashboard_is_well_formed(file: str) -> None:
    d = DASHBOARDS[file]
    assert d["uid"] and len(d["uid"]) <= 40
    assert d["title"].startswith("coralline: ")
    assert 36 <= d["schemaVersion"] <= 41
    assert d.get("id") is None  # importable anywhere
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["tempo"]["type"] == "datasource"
    assert variables["tempo"]["query"] == "tempo"
    if "instance" in variables:
        assert datasource_kind(variables["instance"]["datasource"]) == "prometheus"
        assert variables["instance"]["allValue"] == ".*"

    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {file}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g), p["title"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p.get("title") and p.get("description"), p.get("title")
        assert p["datasource"]["uid"] in ("${datasource}", "${tempo}"), p["title"]
        kind = datasource_kind(p["datasource"])
        assert kind in ("prometheus", "tempo"), p["title"]
        targets = p.get("targets") or []
        assert targets, f"{p['title']!r} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            if "datasource" in t:
                assert datasource_kind(t["datasource"]) == kind, p["title"]
            if kind == "prometheus":
                assert t.get("expr", "").strip(), f"{p['title']!r} {t['refId']} has no expr"
                assert "legendFormat" in t, p["title"]
            else:
                assert t.get("queryType") == "traceql" and t.get("query"), p["title"]


def test_only_tempo_panels_are_not_prometheus() -> None:
    kinds = [(f, title, kind) for f, d in DASHBOARDS.items() for title, _, kind in
             panel_queries(d)]  # fmt: skip
    tempo = [(f, title) for f, title, kind in kinds if kind == "tempo"]
    assert tempo, "no panel links the metrics to traces (a Tempo panel)"
    assert {kind for _, _, kind in kinds} == {"prometheus", "tempo"}
    overview = [
        q for _, q, k in panel_queries(DASHBOARDS["coralline-overview.json"]) if k == "tempo"
    ]
    assert '{ resource.service.name = "coralline-router" }' in overview


def test_every_metric_named_is_exported() -> None:
    families, series = exported()
    unknown_families, unknown_series = [], []
    for where, expr in every_promql():
        unknown_families += [(where, m) for m in metric_names(expr) - families]
        unknown_series += [(where, s) for s in series_names(expr) - series]
    assert not unknown_families, f"metric families not in metrics.py: {unknown_families}"
    assert not unknown_series, f"series names no registry exports: {unknown_series}"


def test_dashboards_use_most_metrics() -> None:
    """A metric no panel shows is probably one the dashboards forgot."""
    families, _ = exported()
    used = set().union(*(metric_names(e) for _, e in every_promql()))
    assert families - used == set(), f"metrics on no panel: {sorted(families - used)}"


def test_rate_windows_are_grafana_intervals() -> None:
    for where, dashboard in DASHBOARDS.items():
        for title, expr in prometheus_queries(dashboard):
            for window in re.findall(r"\[([^\]]*)\]", expr):
                assert window in ("$__rate_interval", "$__range"), (where, title, window)


def test_substitute() -> None:
    expr = 'rate(x{instance=~"$instance"}[$__rate_interval]) * ${__range_s} + ${instance:regex}'
    assert substitute(expr) == 'rate(x{instance=~".*"}[20s]) * 60 + .*'
    assert substitute("increase(y[$__range])", range_="5m") == "increase(y[5m])"
    with pytest.raises(KeyError):
        substitute("rate(x[$unknown])")
    assert metric_names(
        "histogram_quantile(0.5, rate(coralline:round_duration_seconds_bucket[1m]))"
        " / coralline:rounds_total + coralline:num_requests_running"
    ) == {"coralline:round_duration_seconds", "coralline:rounds", "coralline:num_requests_running"}


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `make servers` (installs the Debian "
                    "prometheus package)")  # fmt: skip
    return binary


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (no server needed)."""
    queries = every_promql()
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [{"record": f"check_{i}", "expr": e} for i, (_, e) in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))
    run = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_example_prometheus_config() -> None:
    path = EXAMPLES / "prometheus.yml"
    run = subprocess.run(
        [_promtool(), "check", "config", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    config = yaml.safe_load(path.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    sd = [c["url"] for j in jobs.values() for c in j.get("http_sd_configs", [])]
    assert sd == [SD_URL]
    services = {
        sc["labels"]["service"] for j in jobs.values() for sc in j.get("static_configs", [])
    }
    assert services == {"router", "verifier", "drafter"}


def test_example_grafana_datasources() -> None:
    config = datasource_examples()
    assert config["apiVersion"] == 1
    by_type = {ds["type"]: ds for ds in config["datasources"]}
    assert set(by_type) == {"prometheus", "tempo", "jaeger"}
    uids = [ds["uid"] for ds in config["datasources"]]
    assert len(uids) == len(set(uids))
    prom = by_type["prometheus"]["uid"]
    tempo = by_type["tempo"]["jsonData"]
    assert tempo["tracesToMetrics"]["datasourceUid"] == prom
    assert tempo["serviceMap"]["datasourceUid"] == prom
    assert by_type["jaeger"]["jsonData"]["tracesToMetrics"]["datasourceUid"] == prom
    for d in by_type["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]:
        assert d["datasourceUid"] == by_type["tempo"]["uid"]
    assert traces_to_metrics_queries()
    # Grafana expands $NAME in provisioning files: a literal `$` must be written `$$`
    for ds in config["datasources"]:
        for text in _strings(ds):
            assert not re.search(r"(?<!\$)\$(?!\$)", text.replace("$$", "")), text


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


@pytest.mark.parametrize("accept", [PROMETHEUS_2_ACCEPT, "text/plain;version=0.0.4", ""])
def test_scraped_samples_keep_the_coralline_colon(accept: str) -> None:
    """The dashboards query `coralline:` names: what serve_metrics answers a scraper must
    carry them in its sample lines, whatever format the scraper asks for."""
    metrics = VerifierMetrics()
    metrics.requests.labels(outcome="finished").inc()
    server, port = serve_metrics(metrics.registry)
    try:
        headers = {"Accept": accept} if accept else {}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    names = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    escaped = sorted(n for n in names if not n.startswith("coralline:"))
    assert not escaped, f"{ESCAPED_NAMES}; got {escaped[:5]}..."


# ------------------------------------------------------------------ real Prometheus (slow)

OUTCOMES = [("finished", "eos"), ("finished", "length"), ("finished", "stop"),
            ("finished", "context"), ("cancelled", ""), ("failed", "")]  # fmt: skip


class Activity:
    """Synthetic but realistic activity on the registries, every `period` s in a thread:
    speculative and fallback rounds (0-4 accepted) with GPU-like per-hop timings, proposals
    with their phases, requests of every outcome, chunks through the router, failovers."""

    def __init__(
        self,
        verifiers: list[VerifierMetrics],
        drafters: list[DrafterMetrics],
        router: RouterMetrics,
        period: float = 0.05,
    ) -> None:
        self.verifiers, self.drafters, self.router = verifiers, drafters, router
        self.period = period
        self.rng = random.Random(7)
        self.step_no = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="activity", daemon=True)

    def __enter__(self) -> Activity:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.error is not None and exc[0] is None:
            raise RuntimeError("the synthetic activity thread failed") from self.error

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.period):
                self.step()
        except BaseException as e:  # surfaced by __exit__
            self.error = e

    def step(self) -> None:
        rng = self.rng
        self.step_no += 1
        for i, verifier in enumerate(self.verifiers):
            drafter = self.drafters[i % len(self.drafters)]
            for _ in range(3):
                self._round(verifier, drafter)
            if (self.step_no + i) % 4 == 0:  # a request: start, first token, end
                outcome, reason = OUTCOMES[(self.step_no // 4 + i) % len(OUTCOMES)]
                prompt = rng.randint(20, 400)
                verifier.request_started(prompt, cached=rng.choice((0, prompt // 2)))
                verifier.first_token(rng.uniform(0.03, 0.4))
                verifier.request_done(outcome, reason, rng.uniform(0.5, 12.0))
        # the router relays chunks of several requests and ends one every few steps
        self.router.chunk(rng.randint(1, 3), None, first=rng.uniform(0.05, 0.6))
        for _ in range(4):
            self.router.chunk(rng.randint(1, 5), rng.uniform(0.01, 0.06), first=None)
        if self.step_no % 3 == 0:
            outcome, _ = OUTCOMES[(self.step_no // 3) % len(OUTCOMES)]
            failovers = 1 if self.step_no % 21 == 0 else 0
            self.router.request_done(outcome, rng.uniform(0.5, 15.0), failovers=failovers)

    def _round(self, verifier: VerifierMetrics, drafter: DrafterMetrics) -> None:
        rng = self.rng
        forward, verify, commit = rng.uniform(0.006, 0.02), rng.uniform(3e-4, 2e-3), 4e-4
        if rng.random() < 0.15:  # fallback: the root alone (late / lost drafter)
            drafter_s = None if rng.random() < 0.5 else rng.uniform(0.01, 0.03)
            wait = rng.uniform(0.02, 0.05)
            verifier.round_done(
                seconds=wait + forward + verify + commit, committed=1, tree_nodes=1,
                accepted=0, speculative=False, fallback=True, draft_s=wait,
                drafter_s=drafter_s, forward_s=forward, verify_s=verify, commit_s=commit,
            )  # fmt: skip
            return
        nodes = rng.randint(8, 32)
        accepted = min(rng.choices(range(5), weights=(20, 30, 25, 15, 10))[0], nodes - 1)
        head, lm_head, tree = rng.uniform(2e-3, 6e-3), rng.uniform(1e-3, 3e-3), 5e-4
        drafter_s = head + lm_head + tree
        drafter.proposal(drafter_s, nodes, head, lm_head)
        hit = rng.random() < 0.2  # a pipelined drafter's speculation cache
        drafter.spec_cache.labels(outcome="hit" if hit else "miss").inc()
        drafter.spec_hidden_s.inc(drafter_s if hit else 0.0)
        drafter.batch_steps.observe(rng.randint(1, 8))  # batched drafting (draft/batch.py)
        verifier.batch(rng.randint(1, 8), rng.randint(8, 128), forward + rng.uniform(0, 0.02))
        wait = drafter_s + rng.uniform(5e-4, 4e-3)  # + the network
        verifier.round_done(
            seconds=wait + forward + verify + commit + 3e-4, committed=accepted + 1,
            tree_nodes=nodes, accepted=accepted, speculative=True, fallback=False,
            draft_s=wait, drafter_s=drafter_s, forward_s=forward, verify_s=verify,
            commit_s=commit, bytes_sent=rng.randint(60, 200), bytes_received=nodes * 24,
            prefill_s=rng.uniform(0.02, 0.2) if rng.random() < 0.05 else 0.0,
        )  # fmt: skip


def _measured_switch() -> MeasuredSwitch:
    """A MeasuredSwitch (--speculation measured) that measured both modes at 4 sessions."""
    clock = [0.0]
    switch = MeasuredSwitch(lambda: 4, clock=lambda: clock[0])
    for i in range(60):  # 6 s of rounds, 3 tokens each
        clock[0] += 0.1
        switch(SimpleNamespace(accepted=2) if i else None)
    assert {mode for _, mode in switch.snapshot()[2]} == {True, False}
    return switch


class _SdHandler(BaseHTTPRequestHandler):
    groups: ClassVar[list[dict]] = []

    def do_GET(self) -> None:
        body = json.dumps(self.groups).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_every_panel_query_answers_from_real_prometheus(tmp_path: Path) -> None:
    """Two verifiers, two drafters and a router serve real registries on loopback, fed with
    synthetic rounds; one node of each is found by static targets, the second verifier and
    drafter by HTTP service discovery (as `coralline serve` will publish them). Every
    Prometheus query of every dashboard (and the datasource examples' trace -> metrics
    queries) must return a finite value within 30 s."""
    rng = random.Random(3)
    gauge = lambda hi: lambda: float(rng.randint(0, hi))  # noqa: E731
    verifiers = [VerifierMetrics(running=gauge(8), waiting=gauge(3), retained=gauge(4))
                 for _ in range(2)]  # fmt: skip
    drafters = [DrafterMetrics(sessions=gauge(8), queue=gauge(2)) for _ in range(2)]
    verifiers[0].measured.watch(_measured_switch())  # one verifier with --speculation measured
    router = RouterMetrics(running=gauge(12))
    registries = {
        "verifier0": verifiers[0].registry,
        "verifier1": verifiers[1].registry,
        "drafter0": drafters[0].registry,
        "drafter1": drafters[1].registry,
        "router": router.registry,
    }
    servers: list = []
    ports: dict[str, str] = {}
    for name, registry in registries.items():
        server, port = serve_metrics(registry)
        servers.append(server)
        ports[name] = f"127.0.0.1:{port}"

    class Sd(_SdHandler):
        groups: ClassVar[list[dict]] = [
            {"targets": [ports["verifier1"]], "labels": {"service": "verifier"}},
            {"targets": [ports["drafter1"]], "labels": {"service": "drafter"}},
        ]

    sd = ThreadingHTTPServer(("127.0.0.1", 0), Sd)
    servers.append(sd)
    threading.Thread(target=sd.serve_forever, daemon=True).start()
    sd_url = f"http://127.0.0.1:{sd.server_address[1]}/prometheus/targets"

    queries = every_promql()
    assert len(queries) > 50
    started = time.monotonic()
    try:
        with (
            Activity(verifiers, drafters, router),
            own_prometheus(
                tmp_path / "prometheus",
                static_targets={
                    "router": [ports["router"]],
                    "verifier": [ports["verifier0"]],
                    "drafter": [ports["drafter0"]],
                },
                http_sd_url=sd_url,
            ) as prom,
        ):
            failing = unanswered(prom.query, queries, timeout=30)
            answered_s = time.monotonic() - started
            summary = f"{len(failing)} of {len(queries)} queries gave no data in 30 s"
            if failing and prom.query('count({__name__=~"coralline_.+"})'):
                failing.insert(0, f"Prometheus stored coralline_* names: {ESCAPED_NAMES}")
            assert not failing, (
                summary + ":\n" + "\n".join(failing) + f"\ntargets: {prom.target_summary()}"
            )
            # the per-node split sees both nodes of each service: one found by a static
            # target, the other by HTTP service discovery
            for metric in ("coralline:rounds_total", "coralline:drafter_proposals_total"):
                prom.wait_for(f"count(count by (instance) ({metric})) == 2", timeout=10)
            health = {
                (t["labels"]["job"], t["labels"].get("service"), t["health"])
                for t in prom.targets()
            }
            assert health == {
                ("router", "router", "up"),
                ("verifier", "verifier", "up"),
                ("drafter", "drafter", "up"),
                ("http-sd", "verifier", "up"),
                ("http-sd", "drafter", "up"),
            }
            print(f"{len(queries)} queries answered {answered_s:.1f} s after the start")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
