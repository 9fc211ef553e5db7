"""`coralline bench load`: serving many sessions at once, every method under the same closed loop.

At each concurrency c (1, 2, 4, 8, 16 by default) every method serves max(prompts, c) greedy
requests (request i = prompt i % prompts) with c in flight at any time, `max_new_tokens` each:

  vllm, vllm-ngram   vLLM's CPU build (fp32, eager, the same converted folder), plain and with
                     its n-gram speculation, in its own venv (`make bench-peers`; skipped with
                     the hint when absent): bench/peers.py, bench/vllm_peer.py
  hf-batched         HF `generate`, plain, left-padded batches of c, over the target as this
                     process loaded it (its linear layers are coralline's CPU kernels:
                     cpu_linear.py), so the row measures batching, not kernels
  engine-plain       the engine's plain decoding, sessions batched by the batch scheduler
                     (batching/), in this process
  verifier-coral     coralline: `coralline drafter` + `coralline verifier` (batched, every
                     round speculating with trees sized by the load: `--speculation budget`)
                     as processes, clients through the SDK
  verifier-plain     the same verifier process, every session asking for no drafter (plain
                     decoding batched by the verifier): what speculation is measured against on
                     the serving path
  verifier-coral-switch   the same with `--speculation adaptive`: plain rounds, without the
                     drafter, where speculation is predicted not to pay (batching/switch.py)
  verifier-coral-measured   the same with `--speculation measured` (the verifier's default):
                     every session speculates or decodes plainly together, whichever measured
                     faster at the load (batching/measured.py)
  verifier-coral-pipelined   the same with `coralline drafter --pipeline` (pre-drafting behind
                     a speculation cache); reports its hit rate and the drafting time hidden
  stack-coral        CORAL through the whole stack (`coralline serve`: Ray Serve router, the
                     front; its verifiers with their default `--speculation measured`), clients
                     through the SDK

Per point: aggregate tok/s, mean per-session tok/s, p50 / p99 inter-token latency (a chunk of
several tokens counts its gap once, as vLLM's coalesced outputs do), TTFT p50, acceptance length
and the share of plain rounds (coralline), and the outputs (checked against each other: greedy
outputs of every method should agree; disagreements are counted, not hidden). Every method runs
with EOS ignored (vLLM's `ignore_eos`, coralline's `SamplingParams.ignore_eos`), so every
request makes exactly max_new_tokens tokens and every method does the same work; the token
counts are reported per point.
Methods run one after the other on the same machine in one run; figures are for orientation
(2 shared cores here: every service and the client compete for them). A shared machine drifts
by 10-30% within a run, so `repeats` > 1 makes that many passes over the methods, every other
pass in reverse order (A B C, C B A, ...: drift falls on every method alike), and reports each
point's median over the passes with every pass's figure beside it (`merge_passes`).

Knows nothing about how each method works inside; it times what clients see.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coralline.bench.vllm_peer import Request, num_requests, point

METHODS = (
    "vllm",
    "vllm-ngram",
    "hf-batched",
    "engine-plain",
    "verifier-coral",
    "verifier-plain",
    "verifier-coral-switch",
    "verifier-coral-measured",
    "verifier-coral-pipelined",
    "stack-coral",
)


@dataclass(frozen=True)
class LoadBenchConfig:
    prompts: int = 12  # distinct prompts (the bench's prompt sets, round-robin)
    max_new_tokens: int = 96
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    methods: tuple[str, ...] = METHODS
    model: str = "smollm2-135m-instruct"
    checkpoint: str | None = None  # a CORAL head folder (default: the shipped one)
    threads: int = 2  # every method's compute threads: vLLM's OpenMP threads, this process's
    # torch (hf-batched, engine-plain) and the verifier's (CORALLINE_THREADS); the drafter keeps 1
    repeats: int = 1  # passes over the methods, alternating their order; medians reported

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        if self.prompts < 1 or self.max_new_tokens < 1 or not self.concurrency:
            raise ValueError("prompts, max_new_tokens and concurrency must be positive")
        if min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")

    @classmethod
    def quick(cls, **kw) -> LoadBenchConfig:
        base = {"prompts": 2, "max_new_tokens": 8, "concurrency": (1, 2)}
        base.update(kw)
        return cls(**base)


@dataclass
class _Served:
    request: Request
    tau: float | None = None
    extra: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"bench load: {msg}", file=sys.stderr, flush=True)


def closed_loop(
    c: int, prompts: Sequence[list[int]], serve: Callable[[int, list[int]], _Served]
) -> dict:
    """c worker threads serve max(len(prompts), c) requests; -> the point (+ mean tau)."""
    total = num_requests(len(prompts), c)
    lock = threading.Lock()
    todo = list(range(total))
    done: list[_Served] = []
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                i = todo.pop(0)
            try:
                served = serve(i, prompts[i % len(prompts)])
            except BaseException as exc:  # reported by the caller
                with lock:
                    errors.append(exc)
                return
            with lock:
                done.append(served)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    out = point(c, [s.request for s in done], wall, len(prompts))
    taus = [s.tau for s in done if s.tau is not None]
    out["acceptance_length"] = sum(taus) / len(taus) if taus else None
    rounds = sum(s.extra.get("rounds", 0) for s in done)
    if rounds:  # coralline: the share of rounds the verifier decoded plainly (switch.py)
        out["plain_round_share"] = sum(s.extra.get("plain_rounds", 0) for s in done) / rounds
    return out


def chunks_request(i: int, chunks) -> tuple[Request, object]:
    """A Request from a stream of chunks with .token_ids (and the last .summary): every token's
    arrival time, from the moment this is called (the request's start). Also what
    `coralline bench engine` times its first-round A/B with."""
    r = Request(index=i, start=time.perf_counter())
    summary = None
    for chunk in chunks:
        now = time.perf_counter()
        r.token_ids.extend(chunk.token_ids)
        r.token_times.extend([now] * len(chunk.token_ids))
        summary = getattr(chunk, "summary", None) or summary
    return r, summary


# ---------------------------------------------------------------------- methods
def _engine_plain(cfg, prompts, runner) -> dict:
    from coralline.batching.scheduler import BatchConfig, pooled
    from coralline.engine import Engine
    from coralline.sampling import SamplingParams
    from coralline.threads import one_thread_here

    root = pooled(runner, BatchConfig(slots=max(cfg.concurrency) + 1))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    local = threading.local()

    def serve(i: int, ids: list[int]) -> _Served:
        if not hasattr(local, "runner"):
            one_thread_here()  # the scheduler's thread alone computes with a team (threads.py)
            local.runner = root.fork()
        r, s = chunks_request(i, Engine(local.runner).generate(ids, params))
        local.runner.reset()
        return _Served(r, s.acceptance_length if s else None)

    points = []
    for c in cfg.concurrency:
        _log(f"engine-plain: {c} sessions")
        points.append(closed_loop(c, prompts, serve))
    sched = root.kv.scheduler
    sched.close()
    return {"method": "engine-plain", "points": points, "batches": sched.stats.__dict__}


def _sdk(method: str, cfg, prompts, address: str, drafter: str | None = None) -> dict:
    from coralline.client import Client

    local = threading.local()

    def serve(i: int, ids: list[int]) -> _Served:
        if not hasattr(local, "client"):
            local.client = Client(address, timeout=900)
        chunks = local.client.stream(
            token_ids=ids, max_new_tokens=cfg.max_new_tokens, drafter=drafter, ignore_eos=True
        )
        r, s = chunks_request(i, chunks)
        if s is None:
            return _Served(r)
        return _Served(r, s.acceptance_length, {"rounds": s.rounds, "plain_rounds": s.plain_rounds})

    points = []
    for c in cfg.concurrency:
        _log(f"{method}: {c} sessions")
        points.append(closed_loop(c, prompts, serve))
    return {"method": method, "points": points}


def _verifier_coral(cfg, prompts, method: str) -> dict:
    from coralline.rpc.process import ServerProcess

    pipelined = method == "verifier-coral-pipelined"
    speculation = {"verifier-coral-switch": "adaptive", "verifier-coral-measured": "measured"}.get(
        method, "budget"
    )
    log_dir = Path(tempfile.mkdtemp(prefix="coralline-load-bench-"))
    dargs = ["--model", cfg.model, "--metrics-port", "0", *(["--pipeline"] if pipelined else [])]
    if cfg.checkpoint:
        dargs += ["--draft-checkpoint", cfg.checkpoint]
    drafter = ServerProcess("drafter", dargs, log_dir)
    verifier = None
    try:
        drafter.wait_ready(300)
        sessions = str(max(16, max(cfg.concurrency)))
        verifier = ServerProcess(
            "verifier",
            ["--model", cfg.model, "--drafter-endpoint", drafter.address, "--max-sessions",
             sessions, "--metrics-port", "0", "--speculation", speculation],
            log_dir,
            {"CORALLINE_THREADS": str(cfg.threads)},
        )  # fmt: skip
        verifier.wait_ready(600)
        out = _sdk(
            method, cfg, prompts, verifier.address, "none" if method == "verifier-plain" else None
        )
        out["verifier_metrics"] = _batch_metrics(verifier.metrics_url)
        if pipelined:
            out["speculation_cache"] = _cache_metrics(drafter.metrics_url)
        return out
    finally:
        if verifier is not None:
            verifier.stop()
        drafter.stop()


def _metrics_text(url: str) -> str:
    import urllib.request

    return urllib.request.urlopen(url, timeout=10).read().decode()


def _cache_metrics(url: str) -> dict:
    return cache_counts(_metrics_text(url))


def cache_counts(text: str) -> dict:
    """The drafter's speculation cache from its /metrics text: hits, misses, hit rate, hidden s."""
    out = {"hit": 0.0, "miss": 0.0, "hidden_s": 0.0}
    for line in text.splitlines():
        if line.startswith("coralline:drafter_speculation_cache_total{"):
            for outcome in ("hit", "miss"):
                if f'outcome="{outcome}"' in line:
                    out[outcome] += float(line.split()[-1])
        elif line.startswith("coralline:drafter_speculation_hidden_seconds_total "):
            out["hidden_s"] = float(line.split()[-1])
    seen = out["hit"] + out["miss"]
    out["hit_rate"] = out["hit"] / seen if seen else None
    return out


def _batch_metrics(url: str) -> dict:
    text = _metrics_text(url)
    out = {}
    for line in text.splitlines():
        for name in (
            "batch_sessions_sum",
            "batch_sessions_count",
            "batch_tokens_sum",
            "batch_forward_seconds_sum",
        ):
            if line.startswith(f"coralline:{name} "):
                out[name] = float(line.split()[-1])
    if out.get("batch_sessions_count"):
        out["mean_sessions_per_batch"] = out["batch_sessions_sum"] / out["batch_sessions_count"]
        out["mean_tokens_per_batch"] = out["batch_tokens_sum"] / out["batch_sessions_count"]
    return out


def _stack_coral(cfg, prompts) -> dict:
    from coralline.router.stack import Stack, StackConfig

    log_dir = tempfile.mkdtemp(prefix="coralline-load-bench-")
    stack = Stack(
        StackConfig(
            port=0,
            http_port=0,
            model=cfg.model,
            draft_checkpoint=cfg.checkpoint,
            max_sessions=max(16, max(cfg.concurrency)),
            log_dir=log_dir,
            telemetry=False,
            verifier_threads=cfg.threads,
        )
    )
    try:
        address = stack.start()
        return _sdk("stack-coral", cfg, prompts, address)
    finally:
        stack.stop()


def run(cfg: LoadBenchConfig, command: str = "") -> dict:
    import torch

    from coralline import models
    from coralline.bench.pipeline import _machine, _prompts
    from coralline.target import TargetConfig, TargetRunner
    from coralline.threads import one_thread_here

    torch.set_num_threads(cfg.threads)
    one_thread_here()  # in-process methods compute on threads of their own (threads.py)
    runner = TargetRunner.load(TargetConfig(model=cfg.model))
    texts = [p for _, p in _prompts(runner.tokenizer, cfg.prompts)]
    prompts = [runner.encode(t) for t in texts]
    folder = str(models.resolve(cfg.model))
    passes: dict[str, list[dict]] = {}
    notes: list[str] = []
    orders = []
    for k in range(cfg.repeats):
        order = cfg.methods if k % 2 == 0 else tuple(reversed(cfg.methods))
        orders.append(list(order))
        if cfg.repeats > 1:
            _log(f"pass {k + 1}/{cfg.repeats}: {', '.join(order)}")
        for method in order:
            res = _run_method(method, cfg, prompts, runner, folder, notes)
            if res is not None:
                passes.setdefault(method, []).append(res)
    results = [merge_passes(passes[m]) for m in cfg.methods if m in passes]
    _agreement(results, cfg.max_new_tokens)
    return {
        "bench": "load",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": {**_machine(), "threads": cfg.threads, "server_threads": cfg.threads},
        "config": {
            "prompts": cfg.prompts,
            "max_new_tokens": cfg.max_new_tokens,
            "concurrency": list(cfg.concurrency),
            "methods": list(cfg.methods),
            "model": cfg.model,
            "greedy": True,
            "repeats": cfg.repeats,
        },
        "pass_orders": orders,  # the order the methods ran in, pass by pass
        "results": results,
        "notes": list(dict.fromkeys(notes)),  # a skipped peer is noted once, not per pass
    }


def _run_method(method: str, cfg, prompts, runner, folder: str, notes: list[str]) -> dict | None:
    """One method's points at every concurrency; None when it was skipped or failed (why is
    appended to `notes`: one method failing does not lose the others' figures)."""
    from coralline.bench import peers
    from coralline.threads import on_own_thread

    t0 = time.perf_counter()
    _log(f"{method} ...")
    try:
        if method in ("vllm", "vllm-ngram"):
            if peers.vllm_python() is None:
                notes.append(f"{method} skipped: {peers.install_hint()}")
                return None
            res = peers.run_vllm(
                folder,
                prompts,
                list(cfg.concurrency),
                cfg.max_new_tokens,
                ngram=method == "vllm-ngram",
                threads=cfg.threads,
            )
            res["method"] = method
        elif method == "hf-batched":
            res = on_own_thread(
                lambda: peers.run_hf_batched(
                    runner.model, prompts, list(cfg.concurrency), cfg.max_new_tokens
                )
            )
            res["method"] = method
        elif method == "engine-plain":
            res = _engine_plain(cfg, prompts, runner)
        elif method.startswith("verifier-"):
            res = _verifier_coral(cfg, prompts, method)
        else:
            res = _stack_coral(cfg, prompts)
    except Exception as exc:  # one method failing does not lose the others' figures
        notes.append(f"{method} failed: {type(exc).__name__}: {exc}")
        _log(notes[-1])
        return None
    res["seconds"] = time.perf_counter() - t0
    return res


# the point figures a merge takes the median of (the others come from the first pass)
_MEDIAN_KEYS = (
    "aggregate_tok_s",
    "per_session_tok_s",
    "itl_p50_ms",
    "itl_p99_ms",
    "ttft_p50_ms",
    "acceptance_length",
    "plain_round_share",
)


def merge_passes(runs: list[dict]) -> dict:
    """One method's results from several passes -> one result: each point's figures are the
    median over the passes (`_MEDIAN_KEYS`), with every pass's figure in `<key>_passes`; the
    outputs, token counts and other fields are the first pass's, `outputs_stable` says whether
    every pass produced the same outputs, `seconds` sums the passes. One run is returned as
    it is."""
    if len(runs) == 1:
        return runs[0]
    import statistics

    out = {**runs[0], "passes": len(runs), "seconds": sum(r.get("seconds", 0.0) for r in runs)}
    points = []
    for i, first in enumerate(runs[0]["points"]):
        same = [r["points"][i] for r in runs if i < len(r["points"])]
        pt = dict(first)
        for key in _MEDIAN_KEYS:
            values = [q.get(key) for q in same]
            if any(v is None for v in values):
                continue
            pt[key] = statistics.median(values)
            pt[f"{key}_passes"] = values
        pt["outputs_stable"] = all(q["outputs"] == first["outputs"] for q in same)
        points.append(pt)
    out["points"] = points
    return out


def _agreement(results: list[dict], n: int) -> None:
    """Per method: how many outputs equal hf-batched's (or the first method's), compared on
    their common prefix (every method runs with EOS ignored, so that is the whole output)."""
    ref = next((r for r in results if r["method"] == "hf-batched"), results[0] if results else None)
    if ref is None or not ref["points"]:
        return
    want = ref["points"][0]["outputs"]
    for res in results:
        same = total = 0
        for pt in res["points"]:
            for a, b in zip(pt["outputs"], want, strict=False):
                k = min(len(a), len(b), n)
                total += 1
                same += a[:k] == b[:k]
        res["agrees_with"] = {"reference": ref["method"], "same": same, "outputs": total}


# ---------------------------------------------------------------------- reports
def _f(v, spec=".1f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def markdown(report: dict, plot: str | None = None) -> str:
    cfg = report["config"]
    m = report["machine"]
    lines = [
        f"# Load: {cfg['prompts']} prompts x {cfg['max_new_tokens']} tokens, greedy "
        f"({report['date']})",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('threads', '?')} threads. Command: "
        f"`{report.get('command') or 'coralline bench load'}`",
        "",
        "| method | sessions | aggregate tok/s | tok/s per session | ITL p50 ms | ITL p99 ms | "
        "TTFT p50 ms | tau | plain rounds | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in report["results"]:
        for pt in res["points"]:
            lines.append(
                f"| {res['method']} | {pt['concurrency']} | {_f(pt['aggregate_tok_s'])} | "
                f"{_f(pt['per_session_tok_s'])} | {_f(pt['itl_p50_ms'])} | "
                f"{_f(pt['itl_p99_ms'])} | {_f(pt['ttft_p50_ms'], '.0f')} | "
                f"{_f(pt.get('acceptance_length'), '.2f')} | "
                f"{_f(pt.get('plain_round_share'), '.0%')} | {pt['tokens']} |"
            )
    lines.append("")
    for res in report["results"]:
        if res.get("passes", 1) > 1:
            per = "; ".join(
                f"{pt['concurrency']}: "
                + " / ".join(_f(v) for v in pt.get("aggregate_tok_s_passes", []))
                for pt in res["points"]
            )
            lines.append(
                f"- {res['method']}: medians of {res['passes']} passes (alternating order); "
                f"aggregate tok/s of each pass by sessions: {per}"
            )
            unstable = [pt["concurrency"] for pt in res["points"] if not pt["outputs_stable"]]
            if unstable:
                lines.append(
                    f"- {res['method']}: outputs differed between passes at {unstable} sessions"
                )
        a = res.get("agrees_with")
        if a:
            lines.append(
                f"- {res['method']}: {a['same']}/{a['outputs']} outputs equal {a['reference']}'s "
                "(common prefix)"
            )
        if "verifier_metrics" in res:
            vm = res["verifier_metrics"]
            lines.append(
                f"- {res['method']} batches: "
                f"{_f(vm.get('mean_sessions_per_batch'), '.2f')} sessions, "
                f"{_f(vm.get('mean_tokens_per_batch'), '.1f')} tokens per forward on average"
            )
        if "speculation_cache" in res:
            sc = res["speculation_cache"]
            lines.append(
                f"- {res['method']} speculation cache: {sc['hit']:.0f} hits, {sc['miss']:.0f} "
                f"misses (hit rate {_f(sc['hit_rate'], '.2f')}), {sc['hidden_s']:.1f} s of "
                "drafting hidden behind verification"
            )
    lines += [f"- {n}" for n in report["notes"]]
    if plot:
        lines += ["", f"![load]({plot})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for res in report["results"]:
        xs = [p["concurrency"] for p in res["points"]]
        ax.plot(xs, [p["aggregate_tok_s"] for p in res["points"]], marker="o", label=res["method"])
        bx.plot(xs, [p["itl_p50_ms"] for p in res["points"]], marker="o", label=res["method"])
    for a, title, ylabel in (
        (ax, "aggregate throughput", "tokens / s"),
        (bx, "inter-token latency p50", "ms"),
    ):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent sessions")
        a.set_ylabel(ylabel)
        a.set_title(title)
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict, out: str | Path) -> list[Path]:
    from coralline.bench.report import write_single

    return write_single(report, out, markdown, plot)


def main(
    out: str | None = "bench/out/load.json",
    quick: bool = False,
    command: str = "",
    **kw,
) -> dict:
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = (LoadBenchConfig.quick if quick else LoadBenchConfig)(**kw)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run(cfg, command=command)
    print(markdown(report))
    if out:
        for path in write(report, out):
            print(f"wrote {path}")
    return report
