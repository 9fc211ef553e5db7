"""`coralline trace-report`: the per-hop latency breakdown of coralline traces, as tables and
a PNG timeline.

Reads OTLP/JSON (what the OpenTelemetry Collector's file exporter writes, one export per line,
or one export per file: see spans.py), groups the spans by trace (one trace per request) and
reports:

* per request: end-to-end time of the root span, router overhead (the root minus the
  verifier's SERVER spans: placement, relaying, failover), prefill, rounds, tokens, acceptance
  length tau, tokens/s, failovers, and the per-round means of the hops below;
* per round (one `verifier.round` span): the wait for the proposal split into drafting (the
  drafter's own `drafter.round` span) and network (the rest of the wait), the target forward,
  verification, KV commit, what no child span covers (other), and the drafter's head /
  LM-head / tree-selection time;
* a timeline PNG of one trace: a lane per service (router, verifier, drafter), spans as bars
  at their time since the trace's first span, nested spans stacked, coloured by name (spans
  with status ERROR hatched and outlined in red).

What it knows: the span names and attributes of tracing.py's contract (`specdec.*`,
`gen_ai.*`), parent links, start and end times. Root attributes win; where one is missing the
number is derived from the spans (tokens = sum committed, tau = 1 + mean accepted, tokens/s =
tokens / root duration, failovers = verifier attempts - 1), and a missing child span falls back
to its parent's attribute (drafter_ms, network_ms, head/lm_head/tree ms). What is missing
still is a blank cell (null in JSON), never an error.

What it does not know: spans that were never exported (sampled out, a crashed process) or are
still in flight; time no span covers (it lands in other_ms or router_ms); the offset between
hosts' clocks. Durations are measured on one clock each, so the table's numbers are unaffected,
but the timeline places each service's spans by its own clock: a drafter bar may sit a little
outside its verifier round.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from .spans import Span, by_trace, first_attr, read_otlp_json, root_of
from .tracing import (
    DRAFT_WAIT,
    DRAFTER_HEAD,
    DRAFTER_LM_HEAD,
    DRAFTER_ROUND,
    DRAFTER_RPC,
    DRAFTER_TREE,
    GENERATION_RPC,
    KV_COMMIT,
    ROUTER_PLACE,
    SERVICES,
    TARGET_FORWARD,
    VERIFIER_PREFILL,
    VERIFIER_ROUND,
    VERIFIER_RPC,
    VERIFY,
)

ROUTER, VERIFIER, DRAFTER = SERVICES["router"], SERVICES["verifier"], SERVICES["drafter"]
LANE_ORDER = (ROUTER, VERIFIER, DRAFTER)  # other services follow, sorted by name
REQUEST_OPERATIONS = ("chat ", "text_completion ")  # the router's SERVER span: "{op} {model}"

# (key, header, format); format applies where the value takes it, else str(value)
REQUEST_COLUMNS: list[tuple[str, str, str]] = [
    ("trace_id", "trace", ".8"),
    ("name", "request", ""),
    ("session_id", "session", ".12"),
    ("status", "status", ""),
    ("duration_ms", "total_ms", ".1f"),
    ("router_ms", "router", ".2f"),
    ("prefill_ms", "prefill", ".2f"),
    ("rounds", "rounds", "d"),
    ("tokens", "tokens", "d"),
    ("acceptance_length", "tau", ".2f"),
    ("tokens_per_second", "tok/s", ".1f"),
    ("failovers", "failovers", "d"),
    ("mean_wait_ms", "wait", ".2f"),
    ("mean_drafter_ms", "drafter", ".2f"),
    ("mean_network_ms", "network", ".2f"),
    ("mean_forward_ms", "forward", ".2f"),
    ("mean_verify_ms", "verify", ".2f"),
    ("mean_commit_ms", "kv_commit", ".2f"),
]
ROUND_COLUMNS: list[tuple[str, str, str]] = [
    ("attempt", "attempt", "d"),
    ("round", "round", "d"),
    ("tree_nodes", "nodes", "d"),
    ("tree_depth", "depth", "d"),
    ("accepted", "accepted", "d"),
    ("committed", "committed", "d"),
    ("fallback", "fallback", ""),
    ("round_ms", "round_ms", ".2f"),
    ("wait_ms", "wait", ".2f"),
    ("drafter_ms", "drafter", ".2f"),
    ("network_ms", "network", ".2f"),
    ("forward_ms", "forward", ".2f"),
    ("verify_ms", "verify", ".2f"),
    ("commit_ms", "kv_commit", ".2f"),
    ("other_ms", "other", ".2f"),
    ("head_ms", "head", ".2f"),
    ("lm_head_ms", "lm_head", ".2f"),
    ("tree_ms", "tree", ".2f"),
]
# per-round keys that add up over a request (the totals line); the rest get a mean only
_SUMMABLE = {"tree_nodes", "accepted", "committed"} | {
    k for k, _, _ in ROUND_COLUMNS if k.endswith("_ms")
}
_MEAN_KEYS = ("wait_ms", "drafter_ms", "network_ms", "forward_ms", "verify_ms", "commit_ms")


# ---------------------------------------------------------------------- small helpers
def _num(v: object) -> float | None:
    """A finite number (int, float or numeric string) as float; None otherwise."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _int(v: object) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    x = _num(v)
    return int(x) if x is not None and x.is_integer() else None


def _r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _dur_ms(s: Span) -> float:
    return max(s.end_ns - s.start_ns, 0) / 1e6


def _named_ms(spans: Iterable[Span], name: str) -> float | None:
    """Total duration of the spans called `name`; None when there is none."""
    durations = [_dur_ms(s) for s in spans if s.name == name]
    return sum(durations) if durations else None


def _mean(values: Iterable[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _children(spans: Iterable[Span]) -> dict[str, list[Span]]:
    kids: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        if s.parent_id:
            kids[s.parent_id].append(s)
    return kids


def _is_verifier_request(s: Span) -> bool:
    """The verifier's SERVER span of one request (via the router, or its own public API)."""
    if s.name == GENERATION_RPC:
        return s.kind != "CLIENT"
    return s.name == VERIFIER_RPC and (
        s.kind == "SERVER" or (s.service == VERIFIER and s.kind != "CLIENT")
    )


def _is_router_attempt(s: Span) -> bool:
    """The router's CLIENT span of one verifier attempt."""
    return s.name == VERIFIER_RPC and (
        s.kind == "CLIENT" or (s.service == ROUTER and s.kind != "SERVER")
    )


def _root(spans: list[Span]) -> Span | None:
    """The router's request span; else the earliest (then longest) span whose parent is not in
    the trace; None for no spans."""
    for s in spans:
        if s.service == ROUTER and s.kind == "SERVER" and s.name.startswith(REQUEST_OPERATIONS):
            return s
    return root_of(spans)


# ---------------------------------------------------------------------- rows
def _drafter_parts(d_round: Span | None, kids: dict[str, list[Span]]) -> list[float | None]:
    """head / lm_head / tree ms of a drafter.round: its children's sums, else its attributes."""
    if d_round is None:
        return [None, None, None]
    mine = kids.get(d_round.span_id, [])
    out = []
    for name, attr in (
        (DRAFTER_HEAD, "specdec.head_ms"),
        (DRAFTER_LM_HEAD, "specdec.lm_head_ms"),
        (DRAFTER_TREE, "specdec.tree_ms"),
    ):
        v = _named_ms(mine, name)
        out.append(v if v is not None else _num(d_round.attributes.get(attr)))
    return out


def _round_row(r: Span, kids: dict[str, list[Span]], attempts: dict[str, int]) -> dict:
    a = r.attributes
    mine = kids.get(r.span_id, [])
    wait, forward, verify, commit = (
        _named_ms(mine, n) for n in (DRAFT_WAIT, TARGET_FORWARD, VERIFY, KV_COMMIT)
    )
    d_round = next((s for s in mine if s.name == DRAFTER_ROUND), None)
    drafter = _dur_ms(d_round) if d_round is not None else _num(a.get("specdec.drafter_ms"))
    if wait is not None and drafter is not None:
        network = max(wait - drafter, 0.0)
    else:
        network = _num(a.get("specdec.network_ms"))
    round_ms = _dur_ms(r)
    covered = sum(x for x in (wait, forward, verify, commit) if x is not None)
    head, lm_head, tree = _drafter_parts(d_round, kids)
    fallback = a.get("specdec.fallback")
    return {
        "trace_id": r.trace_id,
        "verifier_span": r.parent_id,
        "attempt": attempts.get(r.parent_id),
        "round": _int(a.get("specdec.round")),
        "tree_nodes": _int(a.get("specdec.tree_nodes")),
        "tree_depth": _int(a.get("specdec.tree_depth")),
        "accepted": _int(a.get("specdec.accepted")),
        "committed": _int(a.get("specdec.committed")),
        "fallback": None if fallback in (None, "") else str(fallback),
        "round_ms": _r3(round_ms),
        "wait_ms": _r3(wait),
        "drafter_ms": _r3(drafter),
        "network_ms": _r3(network),
        "forward_ms": _r3(forward),
        "verify_ms": _r3(verify),
        "commit_ms": _r3(commit),
        "other_ms": _r3(max(round_ms - covered, 0.0)),
        "head_ms": _r3(head),
        "lm_head_ms": _r3(lm_head),
        "tree_ms": _r3(tree),
    }


def _trace_round_rows(group: list[Span]) -> list[dict]:
    """Round rows of one trace's spans (sorted by start)."""
    kids = _children(group)
    servers = [s for s in group if _is_verifier_request(s)]
    attempts = {s.span_id: i for i, s in enumerate(servers, start=1)}
    return [_round_row(s, kids, attempts) for s in group if s.name == VERIFIER_ROUND]


def round_rows(spans: list[Span]) -> list[dict]:
    """One row per `verifier.round` span, by trace (in order of their first span) then start.

    `attempt` (an addition) numbers the verifier requests of the trace in start order (2 after
    a failover; `round` restarts at 1 there); times are ms, None where unknown."""
    return [row for _, group in by_trace(spans) for row in _trace_round_rows(group)]


def _request_row(trace_id: str, group: list[Span]) -> dict:
    root = _root(group)
    attrs = root.attributes if root is not None else {}
    rows = _trace_round_rows(group)
    servers = [s for s in group if _is_verifier_request(s)]
    duration = _dur_ms(root) if root is not None else None
    router_ms = None
    if root is not None and root.service == ROUTER and servers:
        router_ms = max(_dur_ms(root) - sum(_dur_ms(s) for s in servers), 0.0)
    rounds = _int(attrs.get("specdec.rounds"))
    if rounds is None and (rows or servers):
        rounds = len(rows)
    committed = [r["committed"] for r in rows if r["committed"] is not None]
    tokens = _int(attrs.get("gen_ai.usage.output_tokens"))
    if tokens is None and committed:
        tokens = sum(committed)
    accepted = [r["accepted"] for r in rows if r["accepted"] is not None]
    tau = _num(attrs.get("specdec.acceptance_length"))
    if tau is None and accepted:
        tau = 1 + sum(accepted) / len(accepted)
    tps = _num(attrs.get("specdec.tokens_per_second"))
    if tps is None and tokens is not None and duration:
        tps = round(tokens / (duration / 1e3), 3)
    failovers = _int(attrs.get("specdec.failovers"))
    tries = sum(1 for s in group if _is_router_attempt(s)) or len(servers)
    if failovers is None and tries:
        failovers = tries - 1
    session = first_attr(root, group, "specdec.session_id")
    row = {
        "trace_id": trace_id,
        "name": root.name if root is not None else None,
        "session_id": None if session is None else str(session),
        "status": "ERROR" if any(s.status == "ERROR" for s in group) else "OK",
        "duration_ms": _r3(duration),
        "router_ms": _r3(router_ms),
        "prefill_ms": _r3(_named_ms(group, VERIFIER_PREFILL)),
        "rounds": rounds,
        "tokens": tokens,
        "acceptance_length": tau,
        "tokens_per_second": tps,
        "failovers": failovers,
    }
    for key in _MEAN_KEYS:
        row[f"mean_{key}"] = _r3(_mean(r[key] for r in rows))
    row["services"] = sorted({s.service for s in group})
    return row


def request_rows(spans: list[Span]) -> list[dict]:
    """One row per trace, in order of their first span.

    `status` (an addition) is ERROR when any span of the trace is (a failed attempt that
    failed over counts); `mean_*_ms` are per-round means over the rounds that have the value."""
    return [_request_row(tid, group) for tid, group in by_trace(spans)]


# ---------------------------------------------------------------------- tables
def _cell(value: object, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and fmt.endswith("d"):  # a mean of counts
        fmt = ".2f"
    try:
        return format(value, fmt)
    except (ValueError, TypeError):
        return str(value)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def format_table(
    rows: list[dict],
    columns: list[tuple[str, str, str]],
    *,
    footer: list[dict] | None = None,
) -> str:
    """Plain-text table: a header, a rule, one line per row, then (optional) a rule and the
    footer rows. None is a blank cell; numeric columns are right-aligned, the rest left."""
    body = [[_cell(r.get(k), fmt) for k, _, fmt in columns] for r in rows]
    foot = [[_cell(r.get(k), fmt) for k, _, fmt in columns] for r in footer or []]
    lines_of_cells = [[h for _, h, _ in columns], *body, *foot]
    widths = [max(len(line[i]) for line in lines_of_cells) for i in range(len(columns))]
    right = [any(_is_number(r.get(k)) for r in [*rows, *(footer or [])]) for k, _, _ in columns]

    def line(cells: list[str]) -> str:
        cols = zip(cells, widths, right, strict=True)
        return "  ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in cols).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(lines_of_cells[0]), rule, *(line(c) for c in body)]
    if foot:
        out += [rule, *(line(c) for c in foot)]
    return "\n".join(out)


def round_footer(rows: list[dict]) -> list[dict]:
    """The totals line (counts and ms summed) and the means line of a request's rounds."""
    total: dict = {"attempt": "total", "round": len(rows)}
    mean: dict = {"attempt": "mean"}
    for key, _, _ in ROUND_COLUMNS:
        if key in ("attempt", "round"):
            continue
        values = [r[key] for r in rows if _is_number(r.get(key))]
        if not values:
            continue
        if key in _SUMMABLE:
            total[key] = round(sum(values), 3)
        mean[key] = round(sum(values) / len(values), 3)
    return [total, mean]


# ---------------------------------------------------------------------- timeline
_CATEGORY_OF_NAME = {
    ROUTER_PLACE: "router.place",
    VERIFIER_RPC: "Generate RPC",
    GENERATION_RPC: "Generate RPC",
    DRAFTER_RPC: "Draft RPC",
    VERIFIER_PREFILL: "prefill",
    VERIFIER_ROUND: "verifier.round",
    DRAFTER_ROUND: "drafter.round",
    DRAFT_WAIT: "draft_wait",
    TARGET_FORWARD: "target_forward",
    VERIFY: "verify",
    KV_COMMIT: "kv_commit",
    DRAFTER_HEAD: "drafter.head",
    DRAFTER_LM_HEAD: "drafter.lm_head",
    DRAFTER_TREE: "drafter.tree",
}
COLOURS = {  # legend order
    "request": "#4d4d4d",
    "router.place": "#17becf",
    "Generate RPC": "#b0b0b0",
    "Draft RPC": "#d0d0d0",
    "prefill": "#8c564b",
    "verifier.round": "#aec7e8",
    "drafter.round": "#ffbb78",
    "draft_wait": "#d62728",
    "target_forward": "#1f77b4",
    "verify": "#2ca02c",
    "kv_commit": "#9467bd",
    "drafter.head": "#ff7f0e",
    "drafter.lm_head": "#e377c2",
    "drafter.tree": "#bcbd22",
    "other": "#e8e8e8",
}


def _category(s: Span) -> str:
    if s.name.startswith(REQUEST_OPERATIONS):
        return "request"
    return _CATEGORY_OF_NAME.get(s.name, "other")


def _depths(spans: list[Span]) -> dict[str, int]:
    """Row within a lane: a span starting before an earlier one has ended goes one deeper
    (nested spans stack; spans that merely overlap never share a row)."""
    depth: dict[str, int] = {}
    open_ends: list[int] = []
    for s in sorted(spans, key=lambda s: (s.start_ns, -s.end_ns)):
        while open_ends and open_ends[-1] <= s.start_ns:
            open_ends.pop()
        depth[s.span_id] = len(open_ends)
        open_ends.append(max(s.end_ns, s.start_ns))
    return depth


def _lanes(spans: list[Span]) -> list[str]:
    present = {s.service for s in spans}
    return [x for x in LANE_ORDER if x in present] + sorted(present - set(LANE_ORDER))


def _title(trace_id: str, spans: list[Span]) -> str:
    row = _request_row(trace_id, spans)
    facts = []
    if row["tokens"] is not None:
        facts.append(f"{row['tokens']} tokens")
    if row["acceptance_length"] is not None:
        facts.append(f"τ {row['acceptance_length']:.2f}")
    if row["tokens_per_second"] is not None:
        facts.append(f"{row['tokens_per_second']:.1f} tok/s")
    if row["rounds"] is not None:
        facts.append(f"{row['rounds']} rounds")
    if row["failovers"]:
        facts.append(f"{row['failovers']} failover(s)")
    if row["duration_ms"] is not None:
        facts.append(f"{row['duration_ms']:.1f} ms")
    head = f"trace {trace_id}" + (f"  {row['name']}" if row["name"] else "")
    return head + ("\n" + " · ".join(facts) if facts else "")


def _trace_spans(spans: list[Span], trace_id: str) -> list[Span]:
    mine = [s for s in spans if s.trace_id == trace_id]
    if mine:
        return mine
    prefix = trace_id.lower()
    mine = [s for s in spans if s.trace_id.startswith(prefix)]
    if not mine:
        raise ValueError(f"no spans of trace {trace_id!r}")
    if len({s.trace_id for s in mine}) > 1:
        raise ValueError(f"trace prefix {trace_id!r} matches several traces")
    return mine


def plot_timeline(spans: list[Span], trace_id: str, path: str | Path) -> Path:
    """Write the PNG timeline of one trace (exact id or unique prefix) to `path`; returns it.

    Needs matplotlib (the server extra); draws on the Agg canvas without touching pyplot's
    global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    mine = sorted(_trace_spans(spans, trace_id), key=lambda s: (s.start_ns, -s.end_ns))
    trace_id = mine[0].trace_id
    t0 = min(s.start_ns for s in mine)
    lanes = _lanes(mine)
    depth = {}
    rows_of = {}
    for lane in lanes:
        d = _depths([s for s in mine if s.service == lane])
        depth.update(d)
        rows_of[lane] = max(d.values()) + 1
    n_rows = sum(rows_of.values())
    top = {}  # lane -> y of its first row (rows go down)
    y = n_rows - 1
    for lane in lanes:
        top[lane] = y
        y -= rows_of[lane]

    fig = Figure(figsize=(14, max(5.0, 1.5 + 0.32 * n_rows)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars: dict[tuple[float, str, bool], list[tuple[float, float]]] = defaultdict(list)
    for s in mine:
        key = (top[s.service] - depth[s.span_id], _category(s), s.status == "ERROR")
        bars[key].append(((s.start_ns - t0) / 1e6, max(_dur_ms(s), 1e-3)))
    for (row_y, cat, error), ranges in bars.items():
        ax.broken_barh(
            ranges,
            (row_y - 0.4, 0.8),
            facecolors=COLOURS[cat],
            edgecolor="#d62728" if error else "white",  # failed spans: red outline, hatched
            linewidth=1.2 if error else 0.3,
            hatch="//" if error else None,
        )
    _label_rounds(ax, mine, t0, top, depth)
    ax.set_yticks([top[lane] - (rows_of[lane] - 1) / 2 for lane in lanes])
    ax.set_yticklabels([lane.removeprefix("coralline-") for lane in lanes])
    for lane in lanes[1:]:
        ax.axhline(top[lane] + 0.5, color="#888888", linewidth=0.6)
    ax.set_ylim(-0.6, n_rows - 0.4)
    end = max(s.end_ns for s in mine)
    ax.set_xlim(0, max((end - t0) / 1e6, 1e-3) * 1.01)
    ax.set_xlabel("ms since the trace's first span")
    ax.set_title(_title(trace_id, mine), fontsize=10)
    used = {_category(s) for s in mine}
    handles = [Patch(facecolor=c, label=cat) for cat, c in COLOURS.items() if cat in used]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _label_rounds(ax, spans: list[Span], t0: int, top: dict, depth: dict) -> None:
    """The round number on each verifier.round bar wide enough to hold it."""
    width = max(max(s.end_ns for s in spans) - t0, 1)
    for s in spans:
        n = _int(s.attributes.get("specdec.round"))
        if s.name != VERIFIER_ROUND or n is None or (s.end_ns - s.start_ns) < width * 0.012:
            continue
        x = (s.start_ns + s.end_ns - 2 * t0) / 2e6
        ax.text(x, top[s.service] - depth[s.span_id], str(n), ha="center", va="center", fontsize=6)


# ---------------------------------------------------------------------- CLI
def _fail(message: str) -> int:
    print(f"trace-report: {message}", file=sys.stderr)
    return 2


def _read(path: str) -> list[Span]:
    """The file's spans; ValueError with a readable message for anything unreadable."""
    try:
        return read_otlp_json(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not OTLP/JSON traces: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: malformed OTLP/JSON span ({type(e).__name__}: {e})") from None


def _select(traces: dict[str, list[Span]], trace: str | None) -> str | None:
    """The one trace id `trace` (an id or a unique prefix) names; None = all.
    ValueError when it names none or several."""
    if not trace:
        return None
    want = trace.strip().lower()
    hits = [t for t in traces if t.startswith(want)]
    if len(hits) == 1:
        return hits[0]
    shown = ", ".join(t[:12] for t in (hits or list(traces))[:10])
    if not hits:
        raise ValueError(f"no trace {trace!r}; the file holds {len(traces)}: {shown}")
    raise ValueError(f"trace prefix {trace!r} matches {len(hits)} traces: {shown}")


def _print_text(reqs: list[dict], rounds: list[dict] | None, out: TextIO) -> None:
    print("requests (ms; wait .. kv_commit: means per round)", file=out)
    print(format_table(reqs, REQUEST_COLUMNS), file=out)
    if rounds is None:
        return
    for req in reqs:
        mine = [r for r in rounds if r["trace_id"] == req["trace_id"]]
        head = f"\nrounds of trace {req['trace_id']}" + (f" ({req['name']})" if req["name"] else "")
        if not mine:
            print(f"{head}: no verifier.round spans", file=out)
            continue
        print(f"{head}, ms:", file=out)
        print(format_table(mine, ROUND_COLUMNS, footer=round_footer(mine)), file=out)


def main(
    path: str,
    png: str | None = None,
    trace: str | None = None,
    as_json: bool = False,
    rounds: bool = True,
    out: TextIO | None = None,
) -> int:
    """`coralline trace-report`: 0, or 2 with a message on stderr (unreadable file, no spans,
    unknown or ambiguous trace, PNG not written).

    Prints the request table, then (rounds) each request's round table with a totals and a
    means line; as_json prints {"requests": [...], "rounds": [...]} instead (plus "png": its
    path when one was written). png: the timeline of the selected trace, or without `trace`
    of the newest one (latest first span) - one file, at exactly that path."""
    out = sys.stdout if out is None else out
    try:
        spans = _read(path)
        if not spans:
            raise ValueError(f"{path}: no spans in it")
        traces = dict(by_trace(spans))
        chosen = _select(traces, trace)
    except ValueError as e:
        return _fail(str(e))
    selected = [s for tid, g in traces.items() if chosen in (None, tid) for s in g]
    reqs = request_rows(selected)
    rows = round_rows(selected)
    png_path, png_trace = None, None
    if png:
        png_trace = chosen if chosen is not None else list(traces)[-1]
        try:
            png_path = plot_timeline(traces[png_trace], png_trace, png)
        except ImportError as e:
            return _fail(f"the timeline needs matplotlib (pip install 'coralline[server]'): {e}")
        except OSError as e:
            return _fail(f"cannot write {png}: {e.strerror or e}")
    if as_json:
        doc: dict = {"requests": reqs, "rounds": rows}
        if png_path is not None:
            doc["png"] = str(png_path)
        print(json.dumps(doc, indent=2), file=out)
        return 0
    _print_text(reqs, rows if rounds else None, out)
    if png_path is not None:
        print(f"\ntimeline of trace {png_trace}: {png_path}", file=out)
    return 0
