"""coralline.telemetry.report: round and request rows from synthetic traces with known times,
the tables, the JSON output, the PNG timeline and the CLI entry's errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from coralline.telemetry.report import (
    REQUEST_COLUMNS,
    ROUND_COLUMNS,
    format_table,
    main,
    plot_timeline,
    request_rows,
    round_rows,
)
from coralline.telemetry.spans import Span, to_otlp_json

ROUTER, VERIFIER, DRAFTER = "coralline-router", "coralline-verifier", "coralline-drafter"
GENERATE = "coralline.v1.VerifierService/Generate"
T0 = 1_700_000_000_000_000_000  # ns
TRACE_A = "0a1b" + "1" * 28  # speculative, 3 rounds
TRACE_B = "0a2c" + "2" * 28  # plain decoding, no drafter spans, no request attributes
TRACE_C = "7f00" + "3" * 28  # a failover: two verifier requests


class Trace:
    """Spans of one trace; times in ms after `base_ms` (exact in ns)."""

    def __init__(self, trace_id: str, base_ms: int) -> None:
        self.trace_id, self.base_ms, self.spans, self._n = trace_id, base_ms, [], 0

    def add(self, name, service, start, end, parent=None, kind="INTERNAL", status="UNSET", **at):
        self._n += 1
        span = Span(
            trace_id=self.trace_id,
            span_id=f"{self.trace_id[:4]}{self._n:012x}",
            parent_id=parent.span_id if parent is not None else "",
            name=name,
            service=service,
            start_ns=T0 + round((self.base_ms + start) * 1_000_000),
            end_ns=T0 + round((self.base_ms + end) * 1_000_000),
            attributes=at,
            kind=kind,
            status=status,
        )
        self.spans.append(span)
        return span

    def round(self, server, start, end, n, phases, drafter=None, drafter_parts=(), d_attrs=(),
              **at):  # fmt: skip
        """A verifier.round with its phases {name: (start, end)} and optionally a drafter.round
        (start, end) with attributes d_attrs and children [(name, start, end)]."""
        r = self.add("verifier.round", VERIFIER, start, end, server, **{"specdec.round": n}, **at)
        for name, (s, e) in phases.items():
            self.add(f"verifier.{name}", VERIFIER, s, e, r)
        if drafter is not None:
            d_at = {"specdec.round": n, **dict(d_attrs)}
            d = self.add("drafter.round", DRAFTER, *drafter, r, **d_at)
            for name, s, e in drafter_parts:
                self.add(name, DRAFTER, s, e, d)
        return r


def spec_attrs(nodes, depth, accepted, committed, **extra):
    out = {
        "specdec.tree_nodes": nodes,
        "specdec.tree_depth": depth,
        "specdec.accepted": accepted,
        "specdec.committed": committed,
    }
    return out | {f"specdec.{k}": v for k, v in extra.items()}


def trace_a() -> list[Span]:
    t = Trace(TRACE_A, 0)
    root = t.add(
        "chat smollm2",
        ROUTER,
        0,
        100,
        kind="SERVER",
        **{
            "gen_ai.operation.name": "chat",
            "gen_ai.usage.output_tokens": 9,
            "gen_ai.response.finish_reasons": ["stop"],
            "specdec.session_id": "sess-a",
            "specdec.rounds": 3,
            "specdec.acceptance_length": 3.0,
            "specdec.tokens_per_second": 90.0,
            "specdec.failovers": 0,
        },
    )
    t.add("router.place", ROUTER, 0.5, 1, root, **{"specdec.attempt": 1})
    client = t.add(GENERATE, ROUTER, 1, 99, root, kind="CLIENT")
    server = t.add(GENERATE, VERIFIER, 2, 98, client, kind="SERVER")
    t.add("verifier.prefill", VERIFIER, 2, 12, server)
    t.add("coralline.v1.DrafterService/Draft", DRAFTER, 3, 97, server, kind="SERVER")
    # round 1: every span there; the drafter's attributes lose to its child spans
    t.round(
        server, 12, 40, 1,
        {"draft_wait": (12, 24), "target_forward": (24, 34), "verify": (34, 36),
         "kv_commit": (36, 37)},
        drafter=(13, 23),
        drafter_parts=[("drafter.head", 13, 15), ("drafter.head", 15, 17),
                       ("drafter.head", 17, 19), ("drafter.lm_head", 19, 20),
                       ("drafter.lm_head", 20, 21), ("drafter.tree", 21, 22.5)],
        d_attrs={"specdec.head_ms": 5.9, "specdec.lm_head_ms": 1.9, "specdec.tree_ms": 1.4},
        **spec_attrs(8, 4, 2, 3, drafter_ms=9.5, network_ms=1.0),
    )  # fmt: skip
    # round 2: a drafter.round without children: its attributes
    t.round(
        server, 40, 70, 2,
        {"draft_wait": (40, 51), "target_forward": (51, 63), "verify": (63, 66),
         "kv_commit": (66, 67)},
        drafter=(41, 50),
        d_attrs={"specdec.head_ms": 5.0, "specdec.lm_head_ms": 2.5, "specdec.tree_ms": 1.0},
        **spec_attrs(8, 4, 3, 4),
    )  # fmt: skip
    # round 3: no drafter.round (lost) and no target_forward: attributes and blanks
    t.round(
        server, 70, 96, 3,
        {"draft_wait": (70, 78), "verify": (80, 90), "kv_commit": (90, 91)},
        **spec_attrs(6, 3, 1, 2, drafter_ms=7.25, network_ms=0.5),
    )  # fmt: skip
    return t.spans


def trace_b() -> list[Span]:
    t = Trace(TRACE_B, 1000)
    root = t.add("text_completion smollm2", ROUTER, 0, 50, kind="SERVER")
    client = t.add(GENERATE, ROUTER, 1, 49, root, kind="CLIENT")
    server = t.add(
        GENERATE, VERIFIER, 2, 48, client, kind="SERVER", **{"specdec.session_id": "sess-b"}
    )
    t.add("verifier.prefill", VERIFIER, 2, 10, server)
    plain = spec_attrs(1, 0, 0, 1, fallback="no_drafter")
    t.round(
        server,
        10,
        25,
        1,
        {"target_forward": (10, 20), "verify": (20, 22), "kv_commit": (22, 23)},
        **plain,
    )
    t.round(
        server,
        25,
        40,
        2,
        {"target_forward": (25, 36), "verify": (36, 38), "kv_commit": (38, 39)},
        **plain,
    )
    return t.spans  # fmt: skip


def trace_c() -> list[Span]:
    t = Trace(TRACE_C, 2000)
    root = t.add(
        "chat smollm2", ROUTER, 0, 200, kind="SERVER", **{"specdec.failovers": 1,
                                                           "specdec.session_id": "sess-c"}
    )  # fmt: skip
    t.add("router.place", ROUTER, 0.5, 1, root, **{"specdec.attempt": 1})
    c1 = t.add(GENERATE, ROUTER, 1, 60, root, kind="CLIENT", status="ERROR")
    s1 = t.add(GENERATE, VERIFIER, 2, 58, c1, kind="SERVER")
    t.add("verifier.prefill", VERIFIER, 2, 12, s1)
    t.round(
        s1, 12, 40, 1,
        {"draft_wait": (12, 20), "target_forward": (20, 30), "verify": (30, 32),
         "kv_commit": (32, 33)},
        drafter=(13, 19), **spec_attrs(8, 4, 2, 3),
    )  # fmt: skip
    t.add("router.place", ROUTER, 60, 61, root, **{"specdec.attempt": 2})
    c2 = t.add(GENERATE, ROUTER, 61, 199, root, kind="CLIENT")
    s2 = t.add(GENERATE, VERIFIER, 62, 198, c2, kind="SERVER")
    t.add("verifier.prefill", VERIFIER, 62, 80, s2)
    t.round(
        s2, 80, 120, 1,
        {"draft_wait": (80, 95), "target_forward": (95, 110), "verify": (110, 113),
         "kv_commit": (113, 114)},
        drafter=(81, 94), **spec_attrs(8, 4, 3, 4),
    )  # fmt: skip
    t.round(
        s2, 120, 190, 2,
        {"draft_wait": (120, 130), "target_forward": (130, 150), "verify": (150, 152),
         "kv_commit": (152, 153)},
        drafter=(121, 129), **spec_attrs(8, 4, 1, 2),
    )  # fmt: skip
    return t.spans


@pytest.fixture
def spans() -> list[Span]:
    # shuffled services and traces: the report orders by trace start and span start
    return list(reversed(trace_c() + trace_b() + trace_a()))


@pytest.fixture
def otlp_file(tmp_path, spans) -> Path:
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(to_otlp_json(spans)))
    return path


def run(*args, **kwargs) -> tuple[int, str]:
    out = io.StringIO()
    rc = main(*args, out=out, **kwargs)
    return rc, out.getvalue()


# ---------------------------------------------------------------------- rows
def test_round_rows_speculative(spans):
    rows = [r for r in round_rows(spans) if r["trace_id"] == TRACE_A]
    assert [r["round"] for r in rows] == [1, 2, 3]
    r1, r2, r3 = rows
    server = next(s for s in spans if s.name == GENERATE and s.kind == "SERVER"
                  and s.trace_id == TRACE_A)  # fmt: skip
    assert {r["verifier_span"] for r in rows} == {server.span_id}
    assert {r["attempt"] for r in rows} == {1}
    assert r1 == {
        "trace_id": TRACE_A,
        "verifier_span": server.span_id,
        "attempt": 1,
        "round": 1,
        "tree_nodes": 8,
        "tree_depth": 4,
        "accepted": 2,
        "committed": 3,
        "fallback": None,
        "round_ms": 28.0,
        "wait_ms": 12.0,
        "drafter_ms": 10.0,  # the drafter.round span, not the attribute 9.5
        "network_ms": 2.0,  # 12 - 10, not the attribute 1.0
        "forward_ms": 10.0,
        "verify_ms": 2.0,
        "commit_ms": 1.0,
        "other_ms": 3.0,  # 28 - (12 + 10 + 2 + 1)
        "head_ms": 6.0,  # three head forwards of 2 ms
        "lm_head_ms": 2.0,
        "tree_ms": 1.5,
    }
    assert (r2["wait_ms"], r2["drafter_ms"], r2["network_ms"]) == (11.0, 9.0, 2.0)
    assert (r2["forward_ms"], r2["verify_ms"], r2["commit_ms"], r2["other_ms"]) == (
        12.0, 3.0, 1.0, 3.0)  # fmt: skip
    assert (r2["head_ms"], r2["lm_head_ms"], r2["tree_ms"]) == (5.0, 2.5, 1.0)  # attributes
    # round 3: drafter time from the attribute, network = wait - it; no forward span
    assert (r3["wait_ms"], r3["drafter_ms"], r3["network_ms"]) == (8.0, 7.25, 0.75)
    assert r3["forward_ms"] is None
    assert (r3["verify_ms"], r3["commit_ms"], r3["other_ms"]) == (10.0, 1.0, 7.0)
    assert (r3["head_ms"], r3["lm_head_ms"], r3["tree_ms"]) == (None, None, None)


def test_round_rows_plain_decoding(spans):
    rows = [r for r in round_rows(spans) if r["trace_id"] == TRACE_B]
    assert [(r["round"], r["fallback"], r["committed"]) for r in rows] == [
        (1, "no_drafter", 1),
        (2, "no_drafter", 1),
    ]
    for r in rows:
        for key in ("wait_ms", "drafter_ms", "network_ms", "head_ms", "lm_head_ms", "tree_ms"):
            assert r[key] is None, key
    keys = ("round_ms", "forward_ms", "verify_ms", "commit_ms", "other_ms")
    assert [tuple(r[k] for k in keys) for r in rows] == [
        (15.0, 10.0, 2.0, 1.0, 2.0),
        (15.0, 11.0, 2.0, 1.0, 1.0),
    ]


def test_round_rows_failover_and_order(spans):
    rows = round_rows(spans)
    assert [r["trace_id"] for r in rows] == [TRACE_A] * 3 + [TRACE_B] * 2 + [TRACE_C] * 3
    c = rows[5:]
    assert [(r["attempt"], r["round"]) for r in c] == [(1, 1), (2, 1), (2, 2)]
    assert c[0]["verifier_span"] != c[1]["verifier_span"] == c[2]["verifier_span"]
    assert [(r["wait_ms"], r["drafter_ms"], r["network_ms"], r["other_ms"]) for r in c] == [
        (8.0, 6.0, 2.0, 7.0),
        (15.0, 13.0, 2.0, 6.0),
        (10.0, 8.0, 2.0, 37.0),
    ]


def test_request_rows(spans):
    a, b, c = request_rows(spans)
    assert a["trace_id"] == TRACE_A and a["name"] == "chat smollm2"
    assert (a["session_id"], a["status"], a["duration_ms"]) == ("sess-a", "OK", 100.0)
    assert (a["router_ms"], a["prefill_ms"]) == (4.0, 10.0)  # 100 - 96
    assert (a["rounds"], a["tokens"], a["acceptance_length"]) == (3, 9, 3.0)
    assert (a["tokens_per_second"], a["failovers"]) == (90.0, 0)
    assert a["mean_wait_ms"] == pytest.approx(31 / 3, abs=1e-3)
    assert a["mean_drafter_ms"] == 8.75  # (10 + 9 + 7.25) / 3
    assert a["mean_network_ms"] == pytest.approx(4.75 / 3, abs=1e-3)
    assert (a["mean_forward_ms"], a["mean_verify_ms"], a["mean_commit_ms"]) == (11.0, 5.0, 1.0)
    assert a["services"] == [DRAFTER, ROUTER, VERIFIER]

    # no request attributes: everything derived from the spans
    assert (b["name"], b["session_id"], b["duration_ms"]) == ("text_completion smollm2",
                                                              "sess-b", 50.0)  # fmt: skip
    assert (b["router_ms"], b["prefill_ms"], b["rounds"], b["tokens"]) == (4.0, 8.0, 2, 2)
    assert b["acceptance_length"] == 1.0
    assert b["tokens_per_second"] == 40.0  # 2 tokens / 50 ms
    assert b["failovers"] == 0  # one attempt
    assert (b["mean_wait_ms"], b["mean_drafter_ms"], b["mean_network_ms"]) == (None, None, None)
    assert (b["mean_forward_ms"], b["mean_verify_ms"]) == (10.5, 2.0)
    assert b["services"] == [ROUTER, VERIFIER]

    assert (c["status"], c["failovers"], c["duration_ms"]) == ("ERROR", 1, 200.0)
    assert c["router_ms"] == 8.0  # 200 - (56 + 136)
    assert (c["prefill_ms"], c["rounds"], c["tokens"]) == (28.0, 3, 9)
    assert c["acceptance_length"] == 3.0  # 1 + (2 + 3 + 1) / 3
    assert c["tokens_per_second"] == 45.0
    assert c["mean_drafter_ms"] == 9.0


def test_partial_traces_degrade_to_blanks():
    t = Trace("ab" * 16, 0)
    # a verifier.round whose verifier span and router spans never arrived, and a lone drafter
    r = t.add("verifier.round", VERIFIER, 5, 9, **{"specdec.round": "x"})
    t.add("verifier.draft_wait", VERIFIER, 5, 8, r)
    t.add("drafter.head", DRAFTER, 1, 2)
    (row,) = round_rows(t.spans)
    assert (row["attempt"], row["round"], row["accepted"], row["drafter_ms"]) == (
        None, None, None, None)  # fmt: skip
    assert (row["wait_ms"], row["network_ms"], row["other_ms"]) == (3.0, None, 1.0)
    (req,) = request_rows(t.spans)
    assert req["name"] == "drafter.head"  # the earliest span without a parent
    assert (req["router_ms"], req["prefill_ms"], req["tokens"], req["failovers"]) == (
        None, None, None, None)  # fmt: skip
    assert req["rounds"] == 1
    assert request_rows([]) == [] and round_rows([]) == []
    text = format_table([req], REQUEST_COLUMNS)
    assert "drafter.head" in text


# ---------------------------------------------------------------------- tables
def test_format_table_aligns_and_blanks():
    rows = [{"a": "x", "b": 1.5, "c": None}, {"a": "longer", "b": 12.25, "c": [1, 2]}]
    text = format_table(rows, [("a", "name", ""), ("b", "ms", ".2f"), ("c", "list", "")])
    assert text.splitlines() == [
        "name       ms  list",
        "------  -----  ----",
        "x        1.50",
        "longer  12.25  1,2",
    ]


def test_text_report(otlp_file):
    rc, text = run(str(otlp_file))
    assert rc == 0
    lines = text.splitlines()
    header = lines[1].split()
    assert header == [h for _, h, _ in REQUEST_COLUMNS]
    a_line = next(line for line in lines if line.startswith("0a1b1111 "))
    assert a_line.split()[:5] == ["0a1b1111", "chat", "smollm2", "sess-a", "OK"]
    assert "100.0" in a_line and "90.0" in a_line and "3.00" in a_line
    c_line = next(line for line in lines if line.startswith("7f003333 "))
    assert "ERROR" in c_line and "8.00" in c_line and "28.00" in c_line
    for tid in (TRACE_A, TRACE_B, TRACE_C):
        assert f"rounds of trace {tid}" in text
    assert text.count(" ".join(h for _, h, _ in ROUND_COLUMNS[:6])) == 0  # aligned, not joined
    round_headers = [h for _, h, _ in ROUND_COLUMNS]
    assert sum(line.split() == round_headers for line in lines) == 3
    # trace A's totals: 3 rounds, 22 nodes, 6 accepted, 9 committed, 84 ms of rounds
    total = next(line for line in lines if line.lstrip().startswith("total"))
    assert total.split()[:6] == ["total", "3", "22", "6", "9", "84.00"]
    mean = next(line for line in lines if line.lstrip().startswith("mean"))
    assert mean.split()[:5] == ["mean", "7.33", "3.67", "2.00", "3.00"]  # nodes .. committed
    assert "28.00" in mean.split() and "10.33" in mean.split()  # round_ms, wait_ms
    assert "no_drafter" in text

    rc, short = run(str(otlp_file), rounds=False)
    assert rc == 0 and "rounds of trace" not in short and "0a2c2222" in short


def test_json_report_and_json_lines(tmp_path, spans, otlp_file):
    rc, text = run(str(otlp_file), as_json=True)
    assert rc == 0
    doc = json.loads(text)
    assert set(doc) == {"requests", "rounds"}
    assert [r["trace_id"] for r in doc["requests"]] == [TRACE_A, TRACE_B, TRACE_C]
    assert len(doc["rounds"]) == 8
    assert doc["requests"] == request_rows(spans)
    # the Collector's file exporter form: one export per line (here one per service and trace)
    lines = tmp_path / "traces.jsonl"
    exports = []
    for tid in (TRACE_A, TRACE_B, TRACE_C):
        for svc in (ROUTER, VERIFIER, DRAFTER):
            part = [s for s in spans if s.trace_id == tid and s.service == svc]
            if part:
                exports.append(json.dumps(to_otlp_json(part)))
    lines.write_text("\n".join(exports) + "\n")
    rc, text2 = run(str(lines), as_json=True)
    assert rc == 0 and json.loads(text2) == doc


def test_trace_selection(otlp_file, capsys):
    rc, text = run(str(otlp_file), trace="0A1", as_json=True)  # a unique prefix, any case
    assert rc == 0
    doc = json.loads(text)
    assert [r["trace_id"] for r in doc["requests"]] == [TRACE_A]
    assert {r["trace_id"] for r in doc["rounds"]} == {TRACE_A}

    rc, text = run(str(otlp_file), trace="ffff")
    assert rc == 2 and text == ""
    err = capsys.readouterr().err
    assert "no trace 'ffff'" in err and "0a1b" in err

    rc, _ = run(str(otlp_file), trace="0a")  # A and B
    assert rc == 2
    assert "matches 2 traces" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no spans"),
        ('{"resourceSpans": []}', "no spans"),
        ('{"hello": "world"}', "not OTLP/JSON"),
        ("trace,span\n1,2\n", "not OTLP/JSON"),
        ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x"}]}]}]}', "malformed"),
    ],
)
def test_bad_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert run(str(path)) == (2, "")
    assert message in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert run(str(tmp_path / "nope.json"))[0] == 2
    assert "cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------- timeline
def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a drawn 14 x 5 in figure, not an empty canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1000 and height >= 500  # 14 x 5 in at 120 dpi, legend outside the axes


def test_png_default_is_newest_trace(otlp_file, tmp_path):
    png = tmp_path / "timeline.png"
    rc, text = run(str(otlp_file), png=str(png), rounds=False)
    assert rc == 0
    assert_png(png)
    assert f"timeline of trace {TRACE_C}: {png}" in text
    rc, text = run(str(otlp_file), png=str(tmp_path / "b.png"), trace="0a2c", as_json=True)
    assert rc == 0 and json.loads(text)["png"] == str(tmp_path / "b.png")
    assert_png(tmp_path / "b.png")


def test_plot_timeline_lanes(spans, tmp_path):
    out = plot_timeline(spans, TRACE_A[:6], tmp_path / "a.png")
    assert out == tmp_path / "a.png"
    assert_png(out)
    with pytest.raises(ValueError, match="no spans"):
        plot_timeline(spans, "ffff", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_png_unwritable(otlp_file, tmp_path, capsys):
    assert run(str(otlp_file), png=str(tmp_path / "no" / "dir" / "t.png"))[0] == 2
    assert "cannot write" in capsys.readouterr().err
