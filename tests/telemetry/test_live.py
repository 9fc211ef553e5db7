"""The live view: SpanStore's summaries, LiveServer's routes over loopback, and the page in
headless Chromium (synthetic spans named as the services name theirs; no model, no services)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, Counter

from coralline.telemetry.live import LiveServer, SpanStore, root_of, summarize
from coralline.telemetry.spans import Span, from_otlp_json

ROUTER, VERIFIER, DRAFTER = "coralline-router", "coralline-verifier", "coralline-drafter"
GENERATE = "coralline.v1.VerifierService/Generate"
T0 = 1_700_000_000_000_000_000


def make_trace(
    seed: int, accepted: tuple[int, ...] = (2, 3, 1), t0: int = T0, root_attrs: dict | None = None
) -> list[Span]:
    """A request across the three services: router root, verifier prefill and one round per
    entry of `accepted` (each with its drafter round as a cross-service child)."""
    tid = f"{seed:032x}"
    spans: list[Span] = []

    def add(name: str, service: str, parent: Span | None, start_ms: float, end_ms: float,
            kind: str = "INTERNAL", **attrs) -> Span:  # fmt: skip
        s = Span(
            trace_id=tid,
            span_id=f"{seed:08x}{len(spans) + 1:08x}",
            parent_id=parent.span_id if parent else "",
            name=name,
            service=service,
            start_ns=t0 + int(start_ms * 1e6),
            end_ns=t0 + int(end_ms * 1e6),
            attributes=attrs,
            kind=kind,
        )
        spans.append(s)
        return s

    end = 20 + 30 * len(accepted) + 5
    root = add("chat tiny", ROUTER, None, 0, end, "SERVER", **(root_attrs or {}))
    add("router.place", ROUTER, root, 0.5, 1.5)
    client = add(GENERATE, ROUTER, root, 2, end - 1, "CLIENT")
    server = add(GENERATE, VERIFIER, client, 3, end - 2, "SERVER")
    stream = add("coralline.v1.DrafterService/Draft", DRAFTER, server, 4, end - 3, "SERVER")
    add("verifier.prefill", VERIFIER, server, 4, 19)
    for i, acc in enumerate(accepted):
        t = 20 + 30 * i
        r = add(
            "verifier.round", VERIFIER, server, t, t + 28,
            **{"specdec.round": i, "specdec.tree_nodes": 8, "specdec.tree_depth": 4,
               "specdec.accepted": acc, "specdec.committed": acc + 1, "specdec.fallback": False},
        )  # fmt: skip
        add("verifier.draft_wait", VERIFIER, r, t, t + 9)
        d = add("drafter.round", DRAFTER, r, t + 1, t + 8, **{"specdec.round": i})
        add("drafter.head", DRAFTER, d, t + 1, t + 4)
        add("drafter.lm_head", DRAFTER, d, t + 4, t + 6)
        add("drafter.tree", DRAFTER, d, t + 6, t + 8)
        add("verifier.target_forward", VERIFIER, r, t + 9, t + 20)
        add("verifier.verify", VERIFIER, r, t + 20, t + 25)
        add("verifier.kv_commit", VERIFIER, r, t + 25, t + 28)
    assert stream.service == DRAFTER
    return spans


# ---------------------------------------------------------------------- SpanStore
def test_summary_derives_rounds_tau_tokens_and_speed():
    spans = make_trace(1, accepted=(2, 3, 1))
    store = SpanStore()
    store.add(spans)
    (s,) = store.traces()
    root_ms = 20 + 30 * 3 + 5
    assert s["trace_id"] == f"{1:032x}"
    assert s["name"] == "chat tiny"
    assert s["services"] == [DRAFTER, ROUTER, VERIFIER]
    assert s["spans"] == len(spans)
    assert s["rounds"] == 3
    assert s["acceptance_length"] == pytest.approx(1 + 6 / 3)
    assert s["output_tokens"] == 3 + 4 + 2
    assert s["tokens_per_second"] == pytest.approx(9 / (root_ms / 1e3), rel=1e-3)
    assert s["start_ns"] == T0
    assert s["duration_ms"] == pytest.approx(root_ms)
    assert s["status"] == "OK"
    for missing in ("session_id", "model", "input_tokens", "finish_reason"):
        assert s[missing] is None, missing


def test_summary_prefers_the_root_attributes():
    attrs = {
        "specdec.session_id": "sess-1",
        "gen_ai.request.model": "tiny",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 40,
        "gen_ai.response.finish_reasons": ["stop", "length"],
        "specdec.rounds": 9,
        "specdec.acceptance_length": 4.5,
        "specdec.tokens_per_second": 123.4,
    }
    s = summarize(make_trace(2, root_attrs=attrs))
    assert s["session_id"] == "sess-1"
    assert s["model"] == "tiny"
    assert s["input_tokens"] == 12
    assert s["output_tokens"] == 40
    assert s["finish_reason"] == "stop,length"
    assert s["rounds"] == 9
    assert s["acceptance_length"] == 4.5
    assert s["tokens_per_second"] == 123.4


def test_summary_falls_back_to_the_earliest_span_carrying_an_attribute():
    spans = make_trace(6, root_attrs={"gen_ai.request.model": "from-root"})
    server = next(i for i, s in enumerate(spans) if (s.name, s.service) == (GENERATE, VERIFIER))
    totals = {
        "gen_ai.request.model": "from-verifier",
        "specdec.session_id": "sess-v",
        "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 50,
        "gen_ai.response.finish_reasons": ["stop"],
        "specdec.rounds": 11,
        "specdec.acceptance_length": 4.25,
        "specdec.tokens_per_second": 88.5,
    }
    spans[server] = replace(spans[server], attributes=totals)
    s = summarize(spans)
    assert s["name"] == "chat tiny"
    assert s["model"] == "from-root"  # the root wins
    assert s["session_id"] == "sess-v"
    assert (s["input_tokens"], s["output_tokens"], s["finish_reason"]) == (7, 50, "stop")
    assert (s["rounds"], s["acceptance_length"], s["tokens_per_second"]) == (11, 4.25, 88.5)


def test_summary_without_rounds_stays_null_and_errors_show():
    spans = [s for s in make_trace(3) if s.service == ROUTER]
    spans[-1] = replace(spans[-1], status="ERROR", status_message="unavailable")
    s = summarize(spans)
    assert s["services"] == [ROUTER]
    assert s["rounds"] is None
    assert s["acceptance_length"] is None
    assert s["output_tokens"] is None
    assert s["tokens_per_second"] is None
    assert s["status"] == "ERROR"


def test_root_is_the_earliest_span_without_a_stored_parent():
    spans = make_trace(4)
    assert root_of(spans).name == "chat tiny"
    # spans end (and arrive) children first: before the router's arrive, the verifier's server
    # span is the top (its parent, the router's client span, is not stored)
    verifier_only = [s for s in spans if s.service != ROUTER]
    root = root_of(verifier_only)
    assert (root.name, root.service) == (GENERATE, VERIFIER)


def test_a_growing_trace_is_summarised_again():
    spans = make_trace(5)
    store = SpanStore()
    early = [s for s in spans if s.service != ROUTER]
    store.add(early)
    (first,) = store.traces()
    assert first["name"] == GENERATE
    assert first["spans"] == len(early)
    assert ROUTER not in first["services"]
    store.add([s for s in spans if s.service == ROUTER])
    (second,) = store.traces()
    assert second["name"] == "chat tiny"
    assert second["spans"] == len(spans)
    assert ROUTER in second["services"]
    store.add(spans)  # the same span ids again: replaced, not doubled
    assert store.traces()[0]["spans"] == len(spans)
    assert len(store.spans()) == len(spans)


def test_eviction_drops_the_first_arrived_and_listing_is_newest_first():
    store = SpanStore(max_traces=2)
    late = make_trace(10, t0=T0 + 3_000_000_000)
    early = make_trace(11, t0=T0 + 1_000_000_000)
    middle = make_trace(12, t0=T0 + 2_000_000_000)
    for trace in (late, early, middle):
        store.add(trace)
    assert store.trace(late[0].trace_id) is None  # first to arrive, though it starts last
    assert [t["trace_id"] for t in store.traces()] == [middle[0].trace_id, early[0].trace_id]
    assert [t["trace_id"] for t in store.traces(limit=1)] == [middle[0].trace_id]
    assert len(store.spans()) == len(early) + len(middle)
    with pytest.raises(ValueError):
        SpanStore(max_traces=0)


def test_trace_returns_spans_sorted_by_start():
    spans = make_trace(20)
    store = SpanStore()
    store.add(reversed(spans))
    got = store.trace(spans[0].trace_id)
    assert got is not None
    assert [s.start_ns for s in got] == sorted(s.start_ns for s in spans)
    assert got[0].name == "chat tiny"
    assert {s.span_id for s in got} == {s.span_id for s in spans}
    assert store.trace("f" * 32) is None


def test_concurrent_adds_lose_nothing():
    store = SpanStore(max_traces=100)
    traces = [make_trace(100 + i) for i in range(16)]

    def feed(chunk: list[list[Span]]) -> None:
        for trace in chunk:
            for s in trace:
                store.add([s])
                store.traces()

    threads = [threading.Thread(target=feed, args=(traces[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.traces(limit=100)) == 16
    assert len(store.spans()) == sum(len(t) for t in traces)
    assert all(t["rounds"] == 3 for t in store.traces(limit=100))


# ---------------------------------------------------------------------- LiveServer
def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def strict_json(body: bytes):
    def reject(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(body, parse_constant=reject)


@pytest.fixture
def served():
    store = SpanStore()
    registry = CollectorRegistry()
    Counter("coralline_test_requests", "requests seen by the test", registry=registry).inc(3)
    targets = [{"targets": ["127.0.0.1:9100"], "labels": {"service": "verifier"}}]
    server = LiveServer(store, registry=registry, targets=lambda: targets)
    url = server.start()
    try:
        yield store, server, url
    finally:
        server.stop()


def test_start_returns_the_url_and_stop_closes_the_port(served):
    _store, server, url = served
    assert url == f"http://127.0.0.1:{server.port}/" == server.url
    assert server.port > 0
    assert get(url + "healthz")[0] == 200
    server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass


def test_page_favicon_and_health(served):
    _store, _server, url = served
    status, headers, body = get(url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b'id="timeline"' in body and b'id="requests"' in body
    status, headers, body = get(url + "favicon.ico")
    assert status == 200
    assert headers["Content-Type"] == "image/svg+xml"
    assert body.startswith(b"<svg")
    assert get(url + "healthz")[:3:2] == (200, b"ok")


def test_the_page_is_self_contained(served):
    body = get(served[2])[2].decode()
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", body))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(?!/|data:)", body)
    assert "@import" not in body and "url(" not in body


def test_api_traces_lists_summaries(served):
    store, _server, url = served
    a, b = make_trace(30), make_trace(31, t0=T0 + 10**9)
    store.add(a + b)
    status, headers, body = get(url + "api/traces")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    got = strict_json(body)["traces"]
    assert [t["trace_id"] for t in got] == [b[0].trace_id, a[0].trace_id]
    assert got[0]["rounds"] == 3
    assert [t["trace_id"] for t in strict_json(get(url + "api/traces?limit=1")[2])["traces"]] == [
        b[0].trace_id
    ]
    status, _, body = get(url + "api/traces?limit=lots")
    assert status == 400
    assert "limit" in strict_json(body)["error"]


def test_api_trace_detail_and_unknown_ids(served):
    store, _server, url = served
    spans = make_trace(40)
    store.add(spans)
    tid = spans[0].trace_id
    status, _, body = get(url + f"api/traces/{tid}")
    assert status == 200
    detail = strict_json(body)
    assert detail["trace_id"] == tid
    assert detail["summary"]["name"] == "chat tiny"
    assert len(detail["spans"]) == len(spans)
    assert detail["spans"][0] == spans[0].to_dict()
    for path in (f"api/traces/{'0' * 31}9", f"api/traces/{'0' * 31}9/otlp", f"api/traces/{tid}/x"):
        status, headers, body = get(url + path)
        assert status == 404, path
        assert headers["Content-Type"] == "application/json"
        assert strict_json(body)["error"]


def test_otlp_downloads_round_trip(served):
    store, _server, url = served
    a, b = make_trace(50), make_trace(51)
    store.add(a + b)
    status, headers, body = get(url + f"api/traces/{a[0].trace_id}/otlp")
    assert status == 200
    assert headers["Content-Disposition"].startswith("attachment;")
    assert a[0].trace_id in headers["Content-Disposition"]
    assert sorted(from_otlp_json(strict_json(body)), key=lambda s: s.span_id) == sorted(
        a, key=lambda s: s.span_id
    )
    status, headers, body = get(url + "api/otlp")
    assert status == 200
    assert headers["Content-Disposition"].startswith("attachment;")
    assert {s.span_id for s in from_otlp_json(strict_json(body))} == {s.span_id for s in a + b}


def test_metrics_and_prometheus_targets(served):
    _store, _server, url = served
    status, headers, body = get(url + "metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "coralline_test_requests_total 3.0" in body.decode()
    status, headers, body = get(url + "prometheus/targets")
    assert status == 200
    assert strict_json(body) == [{"targets": ["127.0.0.1:9100"], "labels": {"service": "verifier"}}]


def test_without_registry_or_targets():
    server = LiveServer(SpanStore())
    url = server.start()
    try:
        status, _, body = get(url + "metrics")
        assert status == 404
        assert strict_json(body)["error"]
        assert strict_json(get(url + "prometheus/targets")[2]) == []
        status, _, body = get(url + "nowhere")
        assert status == 404
        assert "nowhere" in strict_json(body)["error"]
        assert strict_json(get(url + "api/traces")[2]) == {"traces": []}
    finally:
        server.stop()


def test_bad_input_never_kills_the_server(served):
    store, server, url = served

    def broken():
        raise RuntimeError("discovery failed")

    server.targets = broken
    status, _, body = get(url + "prometheus/targets")
    assert status == 500
    assert strict_json(body)["error"]
    # attributes JSON cannot carry (NaN) come out as null, still valid JSON
    spans = make_trace(60)
    spans[0] = replace(spans[0], attributes={"specdec.tokens_per_second": float("nan")})
    store.add(spans)
    detail = strict_json(get(url + f"api/traces/{spans[0].trace_id}")[2])
    assert detail["spans"][0]["attributes"] == {"specdec.tokens_per_second": None}
    assert strict_json(get(url + "api/traces")[2])["traces"][0]["tokens_per_second"] is not None
    # garbage on the socket, a method it does not serve, a path that is not a path
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
        sock.recv(4096)
    request = urllib.request.Request(url + "api/traces", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 501
    assert get(url + "api/traces/%ZZ%00/otlp")[0] == 404
    assert get(url + "healthz")[:3:2] == (200, b"ok")


# ---------------------------------------------------------------------- the page in Chromium
@pytest.mark.slow
def test_page_in_headless_chromium(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium, console_errors

    store, _server, url = served
    now = time.time_ns()
    first = make_trace(70, accepted=(3, 2, 4, 1, 2), t0=now - 2 * 10**9)
    store.add(first)
    tid = first[0].trace_id

    def css(driver, selector: str) -> list:
        return driver.find_elements(By.CSS_SELECTOR, selector)

    with chromium() as driver:
        driver.get(url)
        wait = WebDriverWait(driver, 15)
        wait.until(lambda d: css(d, f'tr.request[data-trace-id="{tid}"]'))
        wait.until(lambda d: len(css(d, "#timeline g.lane")) == 3)
        lanes = {g.get_attribute("data-service") for g in css(driver, "#timeline g.lane")}
        assert lanes == {ROUTER, VERIFIER, DRAFTER}
        for service in lanes:
            lane = css(driver, f'#timeline g.lane[data-service="{service}"]')[0]
            assert service in lane.text  # the lane's label
            bars = lane.find_elements(By.CSS_SELECTOR, "rect.span")
            assert len(bars) == sum(s.service == service for s in first), service
            assert all(b.get_attribute("data-service") == service for b in bars)
        ids = {r.get_attribute("data-span-id") for r in css(driver, "#timeline rect.span")}
        assert ids == {s.span_id for s in first}
        # a round's phases sit below the round, not on top of it
        y = {r.get_attribute("data-name"): float(r.get_attribute("y"))
             for r in css(driver, "#timeline rect.span")}  # fmt: skip
        assert y["verifier.verify"] > y["verifier.round"] > y[GENERATE]
        assert y["drafter.head"] > y["drafter.round"]
        assert len(css(driver, "#rounds tbody tr")) == 5
        assert css(driver, "#stat-requests")[0].text == "1"
        link = css(driver, "#otlp-link")[0].get_attribute("href")
        assert link.endswith(f"/api/traces/{tid}/otlp")

        second = make_trace(71, accepted=(1, 1), t0=now - 10**9)
        store.add(second)
        tid2 = second[0].trace_id
        wait.until(lambda d: css(d, f'tr.request[data-trace-id="{tid2}"]'))
        rows = [r.get_attribute("data-trace-id") for r in css(driver, "tr.request")]
        assert rows == [tid2, tid]  # newest first
        # nothing selected: the newest is shown
        wait.until(lambda d: css(d, f'rect.span[data-span-id="{second[0].span_id}"]'))
        # a click selects the older one, and it stays shown through refreshes
        css(driver, f'tr.request[data-trace-id="{tid}"]')[0].click()
        wait.until(lambda d: css(d, f'rect.span[data-span-id="{first[0].span_id}"]'))
        time.sleep(2.5)
        assert css(driver, f'rect.span[data-span-id="{first[0].span_id}"]')
        assert "selected" in css(driver, f'tr.request[data-trace-id="{tid}"]')[0].get_attribute(
            "class"
        )
        assert "cannot" not in css(driver, "#status")[0].text
        assert console_errors(driver) == []
