"""Reading the Grafana dashboards in helm/coralline/dashboards: their panels' queries, Grafana's
variables substituted by concrete values (so Prometheus itself can run them), and the
`coralline:` metric families they name."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "helm" / "coralline" / "dashboards"
EXAMPLES = ROOT / "helm" / "coralline" / "examples"

# Datasource variable names -> the kind of datasource they select.
DATASOURCE_VARIABLES = {"datasource": "prometheus", "tempo": "tempo"}

# `$name`, `${name}`, `${name:format}`; Grafana's old `[[name]]` syntax is not used here.
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)")
_METRIC = re.compile(r"coralline:[A-Za-z0-9_:]+")
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def load_dashboards(folder: Path = DASHBOARDS) -> dict[str, dict]:
    """Every *.json dashboard in `folder`, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows and the panels nested in (collapsed) rows included, in order."""
    out: list[dict] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            out.append(panel)
            walk(panel.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return out


def datasource_kind(ref: dict | str | None) -> str | None:
    """ "prometheus" / "tempo" for a datasource reference ({"type", "uid"} or a bare uid/name);
    the variable named in the uid decides, then the type."""
    if ref is None:
        return None
    uid = ref if isinstance(ref, str) else str(ref.get("uid", ""))
    m = _VARIABLE.fullmatch(uid)
    if m:
        return DATASOURCE_VARIABLES.get(m.group(1) or m.group(2))
    return None if isinstance(ref, str) else ref.get("type")


def panel_queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, expression, datasource kind) of every query of every panel: the PromQL
    `expr` of Prometheus targets, the TraceQL `query` of Tempo ones. A target's own datasource
    wins over its panel's."""
    out: list[tuple[str, str, str]] = []
    for panel in all_panels(dashboard):
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets") or []:
            kind = datasource_kind(target.get("datasource")) or datasource_kind(
                panel.get("datasource")
            )
            expr = target.get("expr") if kind == "prometheus" else target.get("query")
            out.append((panel.get("title", ""), str(expr or ""), kind or "unknown"))
    return out


def substitute(
    expr: str,
    rate_interval: str = "20s",
    instance: str = ".*",
    interval: str = "5s",
    range_: str = "1m",
    **extra: str,
) -> str:
    """`expr` with Grafana's variables replaced by concrete values, as Grafana would send it.

    $__rate_interval, $__interval, $__range (and their _ms / _s forms), $instance and any
    `extra` variable (name=value); a variable not known here raises KeyError, so a dashboard
    never ships a query that only Grafana could complete."""
    seconds = {"__interval": interval, "__range": range_}
    values = {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
        "instance": instance,
        **extra,
    }
    for name, dur in seconds.items():
        s = _duration_s(dur)
        values[name + "_s"] = str(int(s))
        values[name + "_ms"] = str(int(s * 1000))

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(repl, expr)


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * units[m.group(2)]


def metric_names(expr: str) -> set[str]:
    """The `coralline:` metric families named in `expr` (`_bucket`, `_sum`, `_count`, `_total`
    stripped: the names `registry.collect()` reports)."""
    return {_family(name) for name in series_names(expr)}


def series_names(expr: str) -> set[str]:
    """The `coralline:` series names in `expr` as written (suffixes kept)."""
    return set(_METRIC.findall(expr))


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(variable name, PromQL) for each `label_values(selector, label)` query variable: the
    query `count by (label) (selector)` that answers what the variable would list."""
    out: list[tuple[str, str]] = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", text, re.S)
        if m:
            out.append((var["name"], f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def prometheus_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL as written) of the dashboard's Prometheus targets."""
    return [(title, expr) for title, expr, kind in panel_queries(dashboard) if kind == "prometheus"]


def datasource_examples() -> dict:
    """helm/coralline/examples/grafana-datasources.yaml, parsed."""
    return yaml.safe_load((EXAMPLES / "grafana-datasources.yaml").read_text())


def traces_to_metrics_queries() -> list[tuple[str, str]]:
    """(datasource / query name, PromQL as Grafana runs it) of the datasource examples'
    trace -> metrics links (`$$` in a provisioning file is a literal `$`)."""
    out = []
    for ds in datasource_examples()["datasources"]:
        for q in ds.get("jsonData", {}).get("tracesToMetrics", {}).get("queries", []):
            out.append((f"{ds['name']} / {q['name']}", q["query"].replace("$$", "$")))
    return out


def every_promql(**values: str) -> list[tuple[str, str]]:
    """(where, PromQL with the variables substituted) of every Prometheus query that the
    dashboards (panels and query variables) and the datasource examples would run; `values`
    go to `substitute` (rate_interval=, instance=, ...)."""
    out = []
    for file, dashboard in load_dashboards().items():
        for title, expr in prometheus_queries(dashboard):
            out.append((f"{file} / {title}", substitute(expr, **values)))
        for name, expr in variable_queries(dashboard):
            out.append((f"{file} / variable ${name}", substitute(expr, **values)))
    for where, expr in traces_to_metrics_queries():
        out.append((f"grafana-datasources.yaml / {where}", substitute(expr, **values)))
    return out


def unanswered(
    query: Callable[[str], list[dict]],
    queries: list[tuple[str, str]],
    timeout: float = 30.0,
    finite: bool = True,
    poll: float = 0.5,
) -> list[str]:
    """Poll all `queries` ((where, PromQL) pairs) together through `query` (e.g.
    OwnPrometheus.query) until each returned a non-empty result (with `finite`: holding a
    finite value), or `timeout`; returns one readable line block per query that never did
    (an error Prometheus gave, such as a parse error, ends that query's polling at once).
    Against a live deployment: `unanswered(prom.query, every_promql())` should be []."""
    pending = dict(enumerate(queries))
    errors: dict[int, str] = {}
    last: dict[int, list[dict]] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for i, (_, expr) in list(pending.items()):
            try:
                result = query(expr)
            except RuntimeError as e:
                errors[i] = str(e)
                del pending[i]
                continue
            last[i] = result
            if result and (not finite or any(_finite(r) for r in result)):
                del pending[i]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll)
    out = []
    for i in sorted([*pending, *errors]):
        where, expr = queries[i]
        if i in errors:
            why = errors[i]
        elif last.get(i):
            why = f"no finite value: {last[i][:2]}"
        else:
            why = "nothing"
        out.append(f"  {where}:\n    {expr}\n    -> {why}")
    return out


def _finite(sample: dict) -> bool:
    values = [sample["value"]] if "value" in sample else sample.get("values", [])
    return any(math.isfinite(float(v[1])) for v in values)
