"""`coralline bench telemetry`: what tracing and metrics cost, on vs off, in ONE run.

Two identical pipelines side by side on loopback, each a `coralline drafter` and a
`coralline verifier` process (CORALLINE_THREADS=1) and a RouterCore in this process:
  on   every service traces (OTLP/gRPC, batched, to an OTLP receiver in this process that
       decodes and stores every span, as `coralline serve`'s live view does) and records
       Prometheus metrics, scraped over HTTP every second (as Prometheus would);
  off  no OTEL_* variables, no metrics port: the defaults.
The same prompts run greedily through both, interleaved prompt by prompt with the order
alternating, so drift of the machine touches both alike. Reported: tokens/s at the client per
pipeline (tokens / wall time, prefill included), the cost (1 - on/off) overall and as the
median of per-prompt ratios, spans received per round, and whether every prompt's tokens are
identical on and off (tracing changes no output).

Output: a JSON report, a markdown table and a PNG (tokens/s per prompt, on vs off).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from coralline.bench.report import display_path


@dataclass(frozen=True)
class TelemetryBenchConfig:
    prompts: int = 12
    repeats: int = 2  # passes over the prompts (order alternates)
    max_new_tokens: int = 64
    model: str = "smollm2-135m-instruct"
    scrape_s: float = 1.0  # how often the on pipeline's /metrics are read

    @classmethod
    def quick(cls, **kw) -> TelemetryBenchConfig:
        return cls(**{"prompts": 3, "repeats": 1, "max_new_tokens": 24, **kw})

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.repeats < 1 or self.max_new_tokens < 1:
            raise ValueError("prompts, repeats and max_new_tokens must be >= 1")


def _log(msg: str) -> None:
    print(f"[bench telemetry] {msg}", file=sys.stderr, flush=True)


class _Scraper(threading.Thread):
    """Reads every /metrics endpoint each `every` seconds (Prometheus's load on a service)."""

    def __init__(self, urls: list[str], every: float) -> None:
        super().__init__(name="scraper", daemon=True)
        self.urls, self.every = urls, every
        self.stop = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            for url in self.urls:
                with urllib.request.urlopen(url, timeout=5) as r:
                    r.read()
                self.scrapes += 1


def _pipeline(log_dir: Path, model: str, env: dict | None, metrics: bool):
    from coralline.rpc.process import ServerProcess

    extra = ["--model", model] + (["--metrics-port", "0"] if metrics else [])
    drafter = ServerProcess("drafter", extra, log_dir, env)
    drafter.wait_ready(180)
    verifier = ServerProcess(
        "verifier", [*extra, "--drafter-endpoint", drafter.address], log_dir, env
    )
    verifier.wait_ready(180)
    return drafter, verifier


async def _generate(core, ids: list[int], max_new_tokens: int) -> tuple[list[int], float, int]:
    from coralline.rpc.protos import generation_pb2

    req = generation_pb2.GenerateRequest(max_new_tokens=max_new_tokens)
    req.token_ids.ids.extend(ids)
    req.sampling.temperature = 0.0
    out: list[int] = []
    rounds = 0
    t0 = time.perf_counter()
    async for chunk in core.generate(req):
        out.extend(chunk.token_ids)
        rounds += 1
    return out, time.perf_counter() - t0, rounds


def run(cfg: TelemetryBenchConfig, command: str = "") -> dict:
    from coralline.bench.pipeline import _prompts
    from coralline.conversation import prompt_ids
    from coralline.models import load_tokenizer
    from coralline.router.core import RouterConfig, RouterCore
    from coralline.telemetry import tracing as tr
    from coralline.telemetry.live import SpanStore
    from coralline.telemetry.receiver import OtlpReceiver
    from coralline.telemetry.tracing import Tracing

    tokenizer = load_tokenizer(cfg.model)
    prompts = _prompts(tokenizer, cfg.prompts)
    ids = [prompt_ids(tokenizer, p, True) for _, p in prompts]
    store = SpanStore(max_traces=100_000)
    # OTLP/gRPC, the exporters' default protocol (ServerProcess children exec without running
    # fork handlers, so a gRPC server here is safe)
    receiver = OtlpReceiver(store.add, transport="grpc")
    endpoint = receiver.start()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": receiver.protocol,
    }
    log_dir = Path(tempfile.mkdtemp(prefix="coralline-bench-telemetry-"))
    procs = []
    try:
        _log("starting two pipelines (drafter + verifier each): telemetry on / off")
        on = _pipeline(log_dir, cfg.model, env, metrics=True)
        procs += on
        off = _pipeline(log_dir, cfg.model, None, metrics=False)
        procs += off
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
        router_tracing = Tracing.with_processors(
            tr.SERVICES["router"], [BatchSpanProcessor(exporter)]
        )
        cores = {
            name: RouterCore(
                RouterConfig(
                    model=cfg.model,
                    verifiers=(verifier.address,),
                    drafters=(drafter.address,),
                    default_drafter="coral",
                ),
                tracing=router_tracing if name == "on" else Tracing.disabled(),
            )
            for name, (drafter, verifier) in (("on", on), ("off", off))
        }
        scraper = _Scraper([p.metrics_url for p in on], cfg.scrape_s)
        scraper.start()
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        loop = asyncio.new_event_loop()
        try:
            # warm-up: one generation each (first-call costs are not telemetry)
            for name in ("on", "off"):
                loop.run_until_complete(_generate(cores[name], ids[0], 8))
            n = 0
            for rep in range(cfg.repeats):
                for i, prompt_ids in enumerate(ids):
                    order = ("on", "off") if (i + rep) % 2 == 0 else ("off", "on")
                    for name in order:
                        out, seconds, rounds = loop.run_until_complete(
                            _generate(cores[name], prompt_ids, cfg.max_new_tokens)
                        )
                        runs[name].append(
                            {
                                "prompt": i,
                                "rep": rep,
                                "tokens": out,
                                "seconds": seconds,
                                "rounds": rounds,
                            }
                        )
                    n += 1
                    _log(f"{n}/{cfg.repeats * len(ids)} prompts")
            for core in cores.values():
                loop.run_until_complete(core.close())
        finally:
            loop.close()
            scraper.stop.set()
        router_tracing.shutdown()  # flushes the router's last spans
    finally:
        for p in procs:
            p.stop()  # SIGTERM: each service flushes its last batch of spans before it exits
        receiver.stop()
    return _report(cfg, command, prompts, runs, store, receiver.spans, scraper.scrapes)


def _report(cfg, command, prompts, runs, store, spans_received, scrapes) -> dict:
    from coralline.bench.pipeline import _machine

    def tps(rs):
        return sum(len(r["tokens"]) for r in rs) / sum(r["seconds"] for r in rs)

    ratios = [
        (len(a["tokens"]) / a["seconds"]) / (len(b["tokens"]) / b["seconds"])
        for a, b in zip(runs["on"], runs["off"], strict=True)
    ]
    pairs = list(zip(runs["on"], runs["off"], strict=True))
    identical = all(a["tokens"] == b["tokens"] for a, b in pairs)
    rounds_on = sum(r["rounds"] for r in runs["on"])
    on, off = tps(runs["on"]), tps(runs["off"])
    return {
        "benchmark": "telemetry",
        "command": command,
        "config": asdict(cfg),
        "machine": _machine(),
        "prompts": [p for _, p in prompts],
        "tokens_per_second": {"on": round(on, 3), "off": round(off, 3)},
        "cost_percent": round(100 * (1 - on / off), 2),
        "median_prompt_ratio": round(statistics.median(ratios), 4),
        "cost_percent_median": round(100 * (1 - statistics.median(ratios)), 2),
        "prompt_ratios": [round(r, 4) for r in ratios],
        "identical_outputs": identical,
        "generations": len(runs["on"]),
        "rounds_on": rounds_on,
        "spans_received": spans_received,
        "spans_per_round": round(spans_received / rounds_on, 2) if rounds_on else None,
        "traces_stored": len(store.traces(limit=1_000_000)),
        "metrics_scrapes": scrapes,
        "per_run": {
            name: [
                {k: v for k, v in r.items() if k != "tokens"} | {"n": len(r["tokens"])} for r in rs
            ]
            for name, rs in runs.items()
        },
    }


def markdown(report: dict, plot: str | None = None) -> str:
    t = report["tokens_per_second"]
    m = report["machine"]
    lines = [
        f"## Telemetry cost ({report['generations']} generations per side, greedy, "
        f"{report['config']['max_new_tokens']} new tokens)",
        "",
        f"Machine: {m.get('cpu', '?')}; each service one torch thread. "
        f"Command: `{report['command']}`",
        "",
        "| telemetry | tokens/s | cost |",
        "|---|---:|---:|",
        f"| off (default) | {t['off']:.2f} | |",
        f"| on: tracing (OTLP, every span) + metrics (scraped every "
        f"{report['config']['scrape_s']:g} s) | {t['on']:.2f} | {report['cost_percent']:+.2f} % |",
        "",
        f"Median per-prompt ratio on/off: {report['median_prompt_ratio']:.4f} "
        f"(cost {report['cost_percent_median']:+.2f} %). Identical tokens on and off: "
        f"{'yes' if report['identical_outputs'] else 'NO'}. Spans received: "
        f"{report['spans_received']} ({report['spans_per_round']} per round), "
        f"{report['metrics_scrapes']} scrapes.",
    ]
    if plot:
        lines += ["", f"![tokens/s per prompt]({plot})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["per_run"]
    x = range(len(runs["on"]))
    fig, ax = plt.subplots(figsize=(10, 4), dpi=110)
    for name, colour in (("off", "#888888"), ("on", "#1f77b4")):
        label = f"telemetry {name}: {report['tokens_per_second'][name]:.2f} tok/s"
        ax.plot(x, [r["n"] / r["seconds"] for r in runs[name]], "o-", color=colour, label=label)
    ax.set_xlabel("generation (prompt x repeat, interleaved)")
    ax.set_ylabel("tokens/s at the client")
    ax.set_title(f"Tracing + metrics cost: {report['cost_percent']:+.2f} % tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(out: str | Path, cfg: TelemetryBenchConfig, command: str = "") -> dict:
    report = run(cfg, command)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(report, out.with_suffix(".png"))
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report, png.name)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {display_path(out)}, {display_path(out.with_suffix('.md'))}, {display_path(png)}")
    return report
