"""`coralline bench router`: what the router costs, measured side by side in one run.

One Stack (router/stack.py): a drafter and a verifier process on loopback, started once; the
router part (Ray, Serve, the public port) is started twice on the same workers, first with the
grpc.aio front (the default ingress), then with Ray Serve's own gRPC proxy. Every generation is
greedy with the CORAL drafter, on the pipeline bench's prompts, sent as the same token ids on
every path (`GenerateRequest.token_ids` / `VerifyRequest.prompt_ids`), so every path does the
same work:
  direct   the verifier's own `VerifierService.Generate` (this process is the client)
  front    the public `Generation` API through the front (the SDK, `coralline.client.Client`)
  proxy    the public API through Serve's gRPC proxy (the SDK)
Measured:
  1. wall time per generated token (prefill included, and after the first chunk) of direct vs
     each ingress, `repeats` runs per prompt and path in the order D I | I D | ... within each
     router phase (direct runs in both phases: each ingress is compared with the direct runs of
     its own phase), the ratios, and whether every path's tokens are identical;
  2. time to the first chunk on each path;
  3. aggregate tokens/s and per-request latency with 1, 2, 4, 8 concurrent clients through the
     front (one thread and one Client each; the same requests at every level; tokens compared
     with the sequential run);
  4. cancellation per ingress: a long generation cancelled by the client after its first chunk
     (the SDK iterator closed), and one stopped by an explicit CancelSession; the verifier's
     Info is polled every 20 ms until the session is gone (freed) or `free_timeout_s` passed
     (then it is stopped with CancelSession so the next trial starts clean). The floor: the
     verifier's own client cancelling its call (the round in flight finishes first).
  5. the OpenAI-compatible HTTP API against the gRPC API through the front (bench/http_api.py):
     tokens/s, ms/token and time to the first chunk interleaved on the same prompts, identical
     text, and how fast a client disconnecting mid-stream frees its session.
What it does not measure: several verifiers or router replicas, Redis, failover, networks other
than loopback, sampling at T > 0. On 2 cores the router's own processes (Ray's
GCS, raylet, Serve controller, replica, proxy) compete with the workers for the CPU in BOTH
paths of a phase: the overhead figure includes that contention only where it differs. Serve's
proxy binds [::] (hard-coded in Ray), the front and the workers 127.0.0.1.

Output: a JSON report, a markdown file next to it (same stem, .md) and a PNG plot (.png):
overhead bars, time to first chunk, tokens/s against clients. Figures come only from this run.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coralline.bench.report import display_path

PATHS = ("direct", "front", "proxy")
INGRESSES = ("front", "proxy")
# the cancellation trials' prompt: long greedy output, so 200 tokens never end early
CANCEL_PROMPT = (
    "Write a long, detailed essay about the history of the printing press, from its invention "
    "to the present day. Cover at least ten different periods and describe each in depth."
)


@dataclass(frozen=True)
class RouterBenchConfig:
    model: str = "smollm2-135m-instruct"
    checkpoint: str | None = None  # CORAL head folder (default: the one shipped for the model)
    drafter: str = "coral"
    prompts: int = 6
    max_new_tokens: int = 64
    repeats: int = 2  # generations per prompt and path in the overhead step
    clients: tuple[int, ...] = (1, 2, 4, 8)  # concurrency levels through the front
    requests_per_level: int = 0  # 0 = the least common multiple of `clients`
    cancel_trials: int = 6  # per ingress and per way of cancelling
    cancel_tokens: int = 200  # max_new_tokens of the generations that get cancelled
    free_timeout_s: float = 5.0  # a session still running this long after the cancel: not freed
    poll_s: float = 0.02  # how often the verifier's Info is read after a cancel
    seed: int = 0  # prompt i uses seed + i on every path (greedy: the seed does not matter)
    startup_timeout_s: float = 180.0  # per worker process

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.max_new_tokens < 1 or self.cancel_tokens < 2:
            raise ValueError("prompts and max_new_tokens must be >= 1, cancel_tokens >= 2")
        if not self.clients or any(c < 1 for c in self.clients):
            raise ValueError("clients must be a non-empty list of counts >= 1")
        if self.repeats < 1 or self.cancel_trials < 1:
            raise ValueError("repeats and cancel_trials must be >= 1")
        if self.free_timeout_s <= 0 or self.poll_s <= 0:
            raise ValueError("free_timeout_s and poll_s must be > 0")
        if self.drafter == "none":
            raise ValueError("the bench measures speculative decoding: drafter must not be none")
        bad = [c for c in self.clients if self.requests % c]
        if bad:
            raise ValueError(
                f"requests_per_level {self.requests} is not a multiple of clients {bad}: "
                "every level must do the same work"
            )

    @property
    def requests(self) -> int:
        return self.requests_per_level or math.lcm(*self.clients)

    @classmethod
    def quick(cls, **kw: Any) -> RouterBenchConfig:
        """What the test runs: 2 prompts x 24 tokens once, clients 1 and 2, 2 cancel trials,
        a session still running 2 s after its cancel counted as not freed."""
        quick = {"prompts": 2, "max_new_tokens": 24, "repeats": 1, "clients": (1, 2)}
        return cls(**{**quick, "cancel_trials": 2, "free_timeout_s": 2.0, **kw})


# ---------------------------------------------------------------------- one generation per path
@dataclass
class Generation:
    ids: list[int]
    seconds: float  # wall time of the whole call at the client
    first_chunk_s: float  # call start to the first chunk
    first_chunk_tokens: int
    chunks: int
    session_id: str

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / max(len(self.ids), 1)


class DirectPath:
    """The verifier's own VerifierService.Generate, with the drafter named in the request."""

    def __init__(self, verifier: str, drafter: str, drafter_name: str) -> None:
        import grpc

        from coralline.client import Client
        from coralline.rpc.protos import verifier_pb2_grpc
        from coralline.rpc.server import channel_options

        self.drafter = drafter
        self.drafter_name = drafter_name
        self._channel = grpc.insecure_channel(verifier, options=channel_options())
        self.stub = verifier_pb2_grpc.VerifierServiceStub(self._channel)
        self.records = Client(verifier, timeout=30)  # the verifier's own GetSession

    def generate(self, ids: Sequence[int], max_new_tokens: int, seed: int) -> Generation:
        from coralline.rpc.protos import verifier_pb2

        req = verifier_pb2.VerifyRequest(
            prompt_ids=list(ids),
            max_new_tokens=max_new_tokens,
            drafter=self.drafter_name,
            drafter_endpoint=self.drafter,
        )
        req.sampling.temperature = 0.0
        req.sampling.seed = seed
        t0 = time.perf_counter()
        return _timed(self.stub.Generate(req, timeout=600), t0)

    def info(self):
        from coralline.rpc.protos import verifier_pb2

        return self.stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=5)

    def cancel(self, session_id: str) -> bool:
        from coralline.rpc.protos import verifier_pb2

        req = verifier_pb2.CancelRequest(session_id=session_id)
        return bool(self.stub.Cancel(req, timeout=5).cancelled)

    def close(self) -> None:
        self.records.close()
        self._channel.close()


def public_generate(
    client, ids: Sequence[int], max_new_tokens: int, seed: int, drafter: str
) -> Generation:
    """One generation through the public API (the SDK's stream, so the first chunk is timed)."""
    t0 = time.perf_counter()
    it = client.stream(
        token_ids=list(ids), max_new_tokens=max_new_tokens, temperature=0.0, seed=seed,
        drafter=drafter,
    )  # fmt: skip
    return _timed(it, t0)


def _timed(chunks_in, t0: float) -> Generation:
    """Collect a stream of chunks (wire messages or SDK chunks: `token_ids`, `session_id`),
    timing the first one and the whole from t0."""
    out: list[int] = []
    chunks, first, first_tokens, sid = 0, 0.0, 0, ""
    for chunk in chunks_in:
        if not chunks:
            first = time.perf_counter() - t0
            first_tokens, sid = len(chunk.token_ids), chunk.session_id
        chunks += 1
        out.extend(chunk.token_ids)
    return Generation(out, time.perf_counter() - t0, first, first_tokens, chunks, sid)


# ---------------------------------------------------------------------- statistics
def _pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation between order statistics)."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist_ms(seconds: Sequence[float]) -> dict | None:
    if not seconds:
        return None
    ms = [1e3 * s for s in seconds]
    return {
        "n": len(ms),
        "mean": statistics.fmean(ms),
        "p50": _pct(ms, 50),
        "p90": _pct(ms, 90),
        "p99": _pct(ms, 99),
        "min": min(ms),
        "max": max(ms),
    }


def _path_stats(runs: list[Generation]) -> dict:
    tokens = sum(len(g.ids) for g in runs)
    seconds = sum(g.seconds for g in runs)
    # after the first chunk: the per-round relay cost alone (prefill and first round left out)
    later_tokens = sum(len(g.ids) - g.first_chunk_tokens for g in runs)
    later_s = sum(g.seconds - g.first_chunk_s for g in runs)
    return {
        "generations": len(runs),
        "tokens": tokens,
        "seconds": seconds,
        "ms_per_token": 1e3 * seconds / tokens if tokens else math.nan,
        "tokens_per_second": tokens / seconds if seconds > 0 else math.nan,
        "after_first_chunk_ms_per_token": 1e3 * later_s / later_tokens
        if later_tokens
        else math.nan,
        "chunks": sum(g.chunks for g in runs),
        "first_chunk_ms": _dist_ms([g.first_chunk_s for g in runs]),
    }


# ---------------------------------------------------------------------- the steps
def _log(msg: str) -> None:
    print(f"router bench: {msg}", file=sys.stderr, flush=True)


def _overhead(
    cfg: RouterBenchConfig,
    ingress: str,
    direct: DirectPath,
    client,
    encoded: list[list[int]],
) -> dict:
    """Direct and `ingress` on every prompt, `repeats` times each, in the order
    D I | I D | D I ... (alternating from run to run and from prompt to prompt), so linear
    drift touches both paths alike."""
    runs: dict[str, list[list[Generation]]] = {"direct": [], ingress: []}
    for i, ids in enumerate(encoded):
        seed = cfg.seed + i
        for path in runs:
            runs[path].append([])
        for r in range(cfg.repeats):
            order = ("direct", ingress) if (i + r) % 2 == 0 else (ingress, "direct")
            for path in order:
                if path == "direct":
                    g = direct.generate(ids, cfg.max_new_tokens, seed)
                else:
                    g = public_generate(client, ids, cfg.max_new_tokens, seed, cfg.drafter)
                runs[path][i].append(g)
        d, p = _path_stats(runs["direct"][i]), _path_stats(runs[ingress][i])
        same = all(g.ids == runs["direct"][i][0].ids for path in runs for g in runs[path][i])
        _log(
            f"{ingress} phase, prompt {i + 1}/{len(encoded)} ({len(ids)} tokens, x{cfg.repeats}): "
            f"direct {d['ms_per_token']:.1f} ms/token, {ingress} {p['ms_per_token']:.1f} "
            f"ms/token; first chunk {d['first_chunk_ms']['p50']:.0f} / "
            f"{p['first_chunk_ms']['p50']:.0f} ms; identical {same}"
        )
    flat = {path: [g for per in r for g in per] for path, r in runs.items()}
    stats = {path: _path_stats(r) for path, r in flat.items()}
    ratio = stats[ingress]["ms_per_token"] / stats["direct"]["ms_per_token"]
    later = (
        stats[ingress]["after_first_chunk_ms_per_token"]
        / stats["direct"]["after_first_chunk_ms_per_token"]
    )
    per_prompt = []
    for i, ids in enumerate(encoded):
        d, p = _path_stats(runs["direct"][i]), _path_stats(runs[ingress][i])
        per_prompt.append(
            {
                "prompt_tokens": len(ids),
                "tokens": len(runs["direct"][i][0].ids),
                "direct_ms_per_token": d["ms_per_token"],
                f"{ingress}_ms_per_token": p["ms_per_token"],
                "direct_first_chunk_ms": [1e3 * g.first_chunk_s for g in runs["direct"][i]],
                f"{ingress}_first_chunk_ms": [1e3 * g.first_chunk_s for g in runs[ingress][i]],
                "identical": all(
                    g.ids == runs["direct"][i][0].ids for path in runs for g in runs[path][i]
                ),
            }
        )
    ratios = [r[f"{ingress}_ms_per_token"] / r["direct_ms_per_token"] for r in per_prompt]
    # the noise the ratio has to be read against: how far apart two direct runs of the same
    # prompt are (relative to their mean), the median over prompts (None with repeats = 1)
    spread = [
        (max(x) - min(x)) / statistics.fmean(x)
        for x in ([g.ms_per_token for g in per] for per in runs["direct"])
        if len(x) > 1
    ]
    return {
        "paths": stats,
        "ratio": ratio,  # ms/token through the ingress over direct, same phase
        "overhead_pct": 100 * (ratio - 1),
        "after_first_chunk_ratio": later,
        "per_prompt_ratio_median": statistics.median(ratios),
        "per_prompt_ratio_min": min(ratios),
        "per_prompt_ratio_max": max(ratios),
        "direct_run_to_run_pct": 100 * statistics.median(spread) if spread else None,
        "per_prompt": per_prompt,
        "ids": {path: [per[0].ids for per in r] for path, r in runs.items()},
    }


def _client_thread(
    address: str,
    work: list[tuple[int, int, list[int], int]],
    cfg: RouterBenchConfig,
    start: threading.Barrier,
    results: dict[int, tuple[int, Generation]],
    errors: list[BaseException],
) -> None:
    """One concurrent client: its own Client, its share of the requests one after another."""
    from coralline.client import Client

    with Client(address, timeout=600) as client:
        start.wait()
        try:
            for j, p, ids, seed in work:
                results[j] = (
                    p,
                    public_generate(client, ids, cfg.max_new_tokens, seed, cfg.drafter),
                )
        except BaseException as e:  # reported after the level
            errors.append(e)


def _concurrency(
    cfg: RouterBenchConfig, address: str, encoded: list[list[int]], reference: list[list[int]]
) -> list[dict]:
    """Aggregate tokens/s through the front with 1, 2, 4, ... client threads, same requests:
    request j is prompt j mod P, and client k of n runs requests k, k + n, k + 2n, ..."""
    levels = []
    jobs = [(j, j % len(encoded), encoded[j % len(encoded)], cfg.seed + j % len(encoded))
            for j in range(cfg.requests)]  # fmt: skip
    for n in cfg.clients:
        results: dict[int, tuple[int, Generation]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(n + 1)
        threads = [
            threading.Thread(
                target=_client_thread,
                args=(address, jobs[k::n], cfg, start, results, errors),
                daemon=True,
            )
            for k in range(n)
        ]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"{n} concurrent clients: {errors[0]!r}") from errors[0]
        done = [results[j] for j in sorted(results)]
        tokens = sum(len(g.ids) for _, g in done)
        level = {
            "clients": n,
            "requests": len(done),
            "requests_per_client": len(jobs) // n,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_second": tokens / wall,
            "latency_ms": _dist_ms([g.seconds for _, g in done]),
            "first_chunk_ms": _dist_ms([g.first_chunk_s for _, g in done]),
            "ms_per_token_per_request": _dist_ms([g.ms_per_token / 1e3 for _, g in done]),
            "identical_to_sequential": all(g.ids == reference[p] for p, g in done),
        }
        levels.append(level)
        _log(
            f"{n} client(s): {len(done)} requests, {tokens} tokens in {wall:.1f} s = "
            f"{level['tokens_per_second']:.1f} tok/s; latency p50 "
            f"{level['latency_ms']['p50']:.0f} ms, p90 {level['latency_ms']['p90']:.0f} ms"
        )
    return levels


def _wait_freed(direct: DirectPath, sid: str, t0: float, timeout_s: float, poll_s: float):
    """Seconds from t0 until `sid` is no longer among the verifier's sessions (None: timeout)
    and how many Info calls it took."""
    polls = 0
    while True:
        polls += 1
        info = direct.info()
        now = time.perf_counter()
        if sid not in info.session_ids:
            return now - t0, polls
        if now - t0 > timeout_s:
            return None, polls
        time.sleep(poll_s)


def _final_state(records, sid: str, timeout_s: float = 5.0) -> tuple[str, int]:
    """A session's record once it no longer runs (state, tokens generated): `records` is a
    Client of the router (its session store) or of the verifier (the verifier's own)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        info = records.get_session(sid, timeout=5)
        if info.state != "running" or time.perf_counter() > deadline:
            return info.state, len(info.token_ids)
        time.sleep(0.05)


class _Stream:
    """A long generation on one path, open until cancelled: `first` is its first chunk's
    session id; `cancel(how)` cancels it the way a trial says; `close()` lets it go."""

    def __init__(self, cfg: RouterBenchConfig, path: str, client, direct: DirectPath,
                 ids: list[int], seed: int) -> None:  # fmt: skip
        self.path, self.client, self.direct = path, client, direct
        t0 = time.perf_counter()
        if path == "direct":
            from coralline.rpc.protos import verifier_pb2

            req = verifier_pb2.VerifyRequest(
                prompt_ids=ids, max_new_tokens=cfg.cancel_tokens, drafter=cfg.drafter,
                drafter_endpoint=direct.drafter,
            )  # fmt: skip
            req.sampling.temperature, req.sampling.seed = 0.0, seed
            self.call = direct.stub.Generate(req, timeout=600)
            self.session_id = next(self.call).session_id
        else:
            self.call = client.stream(
                token_ids=ids, max_new_tokens=cfg.cancel_tokens, temperature=0.0, seed=seed,
                drafter=cfg.drafter,
            )  # fmt: skip
            self.session_id = next(self.call).session_id
        self.first_chunk_s = time.perf_counter() - t0

    def cancel(self, how: str) -> bool | None:
        if how == "client":  # the client goes away: the SDK cancels its call
            self.close()
            return None
        return self.client.cancel(self.session_id, timeout=10)  # CancelSession

    def close(self) -> None:
        if self.path == "direct":
            self.call.cancel()
        else:
            self.call.close()


def _cancel_trial(
    cfg: RouterBenchConfig, path: str, client, direct: DirectPath, ids: list[int], how: str,
    seed: int,
) -> dict:  # fmt: skip
    """Open a long generation, cancel it after its first chunk, time how long the verifier
    keeps running it."""
    stream = _Stream(cfg, path, client, direct, ids, seed)
    sid = stream.session_id
    running_before = sid in direct.info().session_ids
    t0 = time.perf_counter()
    returned = stream.cancel(how)
    call_s = time.perf_counter() - t0
    freed_s, polls = _wait_freed(direct, sid, t0, cfg.free_timeout_s, cfg.poll_s)
    stream.close()
    cleanup = None
    if freed_s is None:  # stop it so the next trial starts clean (and note what that took)
        t1 = time.perf_counter()
        via = "verifier Cancel"
        if path != "direct":
            try:
                via = "CancelSession" if client.cancel(sid, timeout=10) else "none needed"
            except Exception as e:  # the router no longer knows it: the verifier's own Cancel
                via = f"verifier Cancel (CancelSession: {type(e).__name__})"
        if via.startswith("verifier"):
            direct.cancel(sid)
        gone, _ = _wait_freed(direct, sid, t1, 60.0, cfg.poll_s)
        cleanup = {"via": via, "freed_ms": None if gone is None else 1e3 * gone}
    state, tokens = _final_state(direct.records if path == "direct" else client, sid)
    return {
        "session_id": sid,
        "first_chunk_ms": 1e3 * stream.first_chunk_s,
        "running_at_cancel": running_before,
        "call_ms": 1e3 * call_s,  # cancelling the client's call, or the CancelSession call
        "cancel_session_returned": returned,
        "freed": freed_s is not None and state != "finished",
        "freed_ms": None if freed_s is None else 1e3 * freed_s,
        "info_polls": polls,
        "final_state": state,  # the session's record (the router's; direct: the verifier's)
        "tokens_generated": tokens,  # by the time the session ended
        "cleanup": cleanup,
    }


def _cancellation(
    cfg: RouterBenchConfig, path: str, client, direct: DirectPath, ids: list[int]
) -> dict:
    """`cancel_trials` trials per way of cancelling: the client cancels its call, and (through
    the router) an explicit CancelSession while the call stays open."""
    out = {}
    ways = [("client", "client_cancel")]
    if path != "direct":
        ways.append(("explicit", "cancel_session"))
    for how, label in ways:
        trials = []
        for k in range(cfg.cancel_trials):
            t = _cancel_trial(cfg, path, client, direct, ids, how, cfg.seed + k)
            trials.append(t)
            freed = f"freed in {t['freed_ms']:.0f} ms" if t["freed"] else "NOT freed"
            if t["freed_ms"] is None:
                freed += f" within {cfg.free_timeout_s:g} s"
            _log(
                f"{path} {label} {k + 1}/{cfg.cancel_trials}: {freed} "
                f"(call {t['call_ms']:.1f} ms, {t['tokens_generated']} tokens, "
                f"state {t['final_state']})"
            )
        freed = [t["freed_ms"] for t in trials if t["freed"]]
        out[label] = {
            "trials": len(trials),
            "freed": len(freed),
            "freed_fraction": len(freed) / len(trials),
            "freed_ms": _dist_ms([f / 1e3 for f in freed]),
            "call_ms": _dist_ms([t["call_ms"] / 1e3 for t in trials]),
            "tokens_generated_mean": statistics.fmean(t["tokens_generated"] for t in trials),
            "per_trial": trials,
        }
    return out


# ---------------------------------------------------------------------- the benchmark
def _machine() -> dict:
    import grpc
    import ray
    from google import protobuf

    from coralline.bench import side_by_side as bench

    info = bench.machine(bench.BenchConfig())
    info.update(
        python=platform.python_version(),
        ray=ray.__version__,
        grpcio=grpc.__version__,
        protobuf=protobuf.__version__,
        server_threads=1,
    )
    return info


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    out = []
    for text in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


def run(cfg: RouterBenchConfig, command: str = "") -> dict:
    from coralline import models
    from coralline.bench import http_api
    from coralline.bench.pipeline import _prompts
    from coralline.client import Client
    from coralline.draft.registry import shipped_head
    from coralline.router.stack import Stack, StackConfig

    t_run = time.perf_counter()
    load_before = os.getloadavg()
    log_dir = Path(tempfile.mkdtemp(prefix="coralline-router-bench-"))
    stack = Stack(
        StackConfig(
            port=0,
            http_port=0,
            model=cfg.model,
            draft_checkpoint=cfg.checkpoint,
            log_dir=str(log_dir),
            dashboard_port=0,
        )
    )
    direct: DirectPath | None = None
    timings: dict[str, Any] = {"router_start_s": {}, "router_stop_s": {}}
    overhead: dict[str, dict] = {}
    cancellation: dict[str, dict] = {}
    levels: list[dict] = []
    http: dict = {}
    ttft_direct: list[float] = []
    notes: list[str] = []
    try:
        _log("starting the drafter and verifier processes")
        t0 = time.perf_counter()
        stack.start_workers(cfg.startup_timeout_s)
        timings["workers_s"] = time.perf_counter() - t0
        tokenizer = models.load_tokenizer(cfg.model)
        prompts = _prompts(tokenizer, cfg.prompts)
        encoded = _encode(tokenizer, [p for _, p in prompts])
        cancel_ids = _encode(tokenizer, [CANCEL_PROMPT])[0]
        direct = DirectPath(stack.verifiers[0].address, stack.drafters[0].address, cfg.drafter)
        _log(f"workers up in {timings['workers_s']:.1f} s; {len(encoded)} prompts")
        for ingress in INGRESSES:
            t0 = time.perf_counter()
            # the proxy phase without the HTTP ingress deployment: gRPC straight to the router
            stack.start_router(ingress, http=ingress == "front")
            timings["router_start_s"][ingress] = time.perf_counter() - t0
            _log(
                f"router up with the {ingress} ingress at {stack.address} in "
                f"{timings['router_start_s'][ingress]:.1f} s"
            )
            with Client(stack.address, timeout=600) as client:
                # first-call costs (channels, drafter sessions, Serve handles) stay out
                direct.generate(encoded[0], 8, cfg.seed)
                public_generate(client, encoded[0], 8, cfg.seed, cfg.drafter)
                overhead[ingress] = _overhead(cfg, ingress, direct, client, encoded)
                ttft_direct += [
                    ms / 1e3
                    for r in overhead[ingress]["per_prompt"]
                    for ms in r["direct_first_chunk_ms"]
                ]
                if ingress == "front":
                    levels = _concurrency(
                        cfg, stack.address, encoded, overhead["front"]["ids"]["front"]
                    )
                    # the floor of the cancellation step: the verifier's own client goes away
                    cancellation["direct"] = _cancellation(cfg, "direct", None, direct, cancel_ids)
                    http = http_api.compare(cfg, stack.http_url, client, encoded, _log)
                    http["disconnect"] = http_api.disconnect_trials(
                        cfg, stack.http_url, direct, cancel_ids, _log
                    )
                cancellation[ingress] = _cancellation(cfg, ingress, client, direct, cancel_ids)
            t0 = time.perf_counter()
            stack.stop_router()
            timings["router_stop_s"][ingress] = time.perf_counter() - t0
            _log(f"router ({ingress}) stopped in {timings['router_stop_s'][ingress]:.1f} s")
    finally:
        if direct is not None:
            direct.close()
        with contextlib.suppress(Exception):
            stack.stop()
        shutil.rmtree(log_dir, ignore_errors=True)

    # identical tokens: every path on every prompt, against the first direct run
    ids = {ingress: overhead[ingress].pop("ids") for ingress in INGRESSES}
    per_prompt_same = [
        ids["front"]["direct"][i]
        == ids["front"]["front"][i]
        == ids["proxy"]["direct"][i]
        == ids["proxy"]["proxy"][i]
        and all(overhead[g]["per_prompt"][i]["identical"] for g in INGRESSES)  # every repeat
        for i in range(len(encoded))
    ]
    concurrent_same = all(lv["identical_to_sequential"] for lv in levels)
    if not all(per_prompt_same) or not concurrent_same:
        notes.append("outputs DIFFER across paths on some prompt: a bug (greedy must be identical)")
    if not all(http["identical_text"]) or not all(http["usage_equals_grpc_tokens"]):
        notes.append("the HTTP API's text or usage DIFFERS from the gRPC API's on some prompt")
    ttft = {
        "direct": _dist_ms(ttft_direct),
        "front": overhead["front"]["paths"]["front"]["first_chunk_ms"],
        "proxy": overhead["proxy"]["paths"]["proxy"]["first_chunk_ms"],
    }
    ms_per_token = {
        "direct": statistics.fmean(
            overhead[i]["paths"]["direct"]["ms_per_token"] for i in INGRESSES
        ),
        "front": overhead["front"]["paths"]["front"]["ms_per_token"],
        "proxy": overhead["proxy"]["paths"]["proxy"]["ms_per_token"],
    }
    cancel_summary = {
        path: {
            label: {
                "freed_fraction": c["freed_fraction"],
                "freed": f"{c['freed']}/{c['trials']}",
                "freed_ms_p50": c["freed_ms"]["p50"] if c["freed_ms"] else None,
                "freed_ms_max": c["freed_ms"]["max"] if c["freed_ms"] else None,
            }
            for label, c in cancellation[path].items()
        }
        for path in PATHS
    }
    front_c, proxy_c, direct_c = (cancellation[p] for p in ("front", "proxy", "direct"))
    p50 = {p: _f(cancel_summary[p]["client_cancel"]["freed_ms_p50"], ".0f") for p in PATHS}
    evidence = (
        f"client cancel frees the verifier's session through the front in "
        f"{front_c['client_cancel']['freed']}/{front_c['client_cancel']['trials']} trials, "
        f"through Serve's proxy in {proxy_c['client_cancel']['freed']}/"
        f"{proxy_c['client_cancel']['trials']}; CancelSession: "
        f"{front_c['cancel_session']['freed']}/{front_c['cancel_session']['trials']} vs "
        f"{proxy_c['cancel_session']['freed']}/{proxy_c['cancel_session']['trials']}; "
        f"median time to free after a client cancel: front {p50['front']} ms, proxy "
        f"{p50['proxy']} ms, the verifier's own client going away (the floor: the round in "
        f"flight ends first) {p50['direct']} ms "
        f"({direct_c['client_cancel']['freed']}/{direct_c['client_cancel']['trials']})"
    )
    timings["total_s"] = time.perf_counter() - t_run
    machine = _machine()
    # other work on the machine shows here (the bench itself keeps ~2 cores busy)
    machine["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
    return {
        "what": f"router overhead, first chunk, concurrency and cancellation, {cfg.model}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "machine": machine,
        "settings": {
            **asdict(cfg),
            "clients": list(cfg.clients),
            "requests_per_level": cfg.requests,
            "checkpoint": display_path(cfg.checkpoint or shipped_head(cfg.model) or ""),
            "paths": list(PATHS),
            "prompt_sets": [s for s, _ in prompts],
            "cancel_prompt": CANCEL_PROMPT,
            "temperature": 0.0,
        },
        "timings": timings,
        "ms_per_token": ms_per_token,
        "ratios": {
            "front_over_direct": overhead["front"]["ratio"],
            "proxy_over_direct": overhead["proxy"]["ratio"],
        },
        "overhead_pct": {i: overhead[i]["overhead_pct"] for i in INGRESSES},
        "within_5_percent": {i: overhead[i]["overhead_pct"] <= 5.0 for i in INGRESSES},
        "overhead": overhead,
        "first_chunk_ms": ttft,
        "identical": {
            "per_prompt": per_prompt_same,
            "concurrent": concurrent_same,
            "all": all(per_prompt_same) and concurrent_same,
        },
        "concurrency": {
            "ingress": "front",
            "note": "one verifier runs one round at a time: aggregate throughput barely scales",
            "levels": levels,
        },
        "cancellation": cancellation,
        "cancellation_summary": cancel_summary,
        "cancellation_evidence": evidence,
        "http": http,
        "notes": notes,
    }


# ---------------------------------------------------------------------- output
def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict, plot: str | None = None) -> str:
    from coralline.bench import http_api

    s, m, t = report["settings"], report["machine"], report["timings"]
    mpt, ttft = report["ms_per_token"], report["first_chunk_ms"]
    direct_later = [
        report["overhead"][i]["paths"]["direct"]["after_first_chunk_ms_per_token"]
        for i in INGRESSES
    ]
    lines = [
        f"# coralline bench router: {report['what']}",
        "",
        f"- date: {report['date']}; command: `{report['command']}`",
        f"- machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, ray {m['ray']}, "
        f"grpcio {m['grpcio']}, 1 torch thread per worker; {m['platform']}; load average "
        f"(1 min) {m['load_average_1_5_15_min']['before'][0]:.1f} before, "
        f"{m['load_average_1_5_15_min']['after'][0]:.1f} after",
        f"- 1 drafter + 1 verifier process, 1 router replica; {s['prompts']} prompts x "
        f"{s['max_new_tokens']} new tokens x {s['repeats']} per path, greedy, drafter "
        f"{s['drafter']}, token ids in; direct and the ingress interleaved (D I, I D, ...) in "
        "each router phase",
        f"- startup: workers {t['workers_s']:.1f} s; router with the front "
        f"{t['router_start_s']['front']:.1f} s, with the proxy "
        f"{t['router_start_s']['proxy']:.1f} s; whole run {t['total_s']:.0f} s",
        "",
        "## Overhead per token and time to the first chunk",
        "",
        "| path | ms/token | vs direct (same phase) | after the first chunk: ms/token, vs "
        "direct | first chunk p50 / p90 ms |",
        "|---|---|---|---|---|",
        f"| direct (verifier Generate) | {mpt['direct']:.1f} | 1.000 | "
        f"{statistics.fmean(direct_later):.1f}, 1.000 "
        f"| {ttft['direct']['p50']:.0f} / {ttft['direct']['p90']:.0f} |",
    ]
    for i in INGRESSES:
        o = report["overhead"][i]
        d = o["paths"]["direct"]["ms_per_token"]
        lines.append(
            f"| {i} (public API) | {mpt[i]:.1f} | {o['ratio']:.3f} ({o['overhead_pct']:+.1f} %; "
            f"direct {d:.1f} in that phase; per prompt {o['per_prompt_ratio_min']:.2f} to "
            f"{o['per_prompt_ratio_max']:.2f}, median {o['per_prompt_ratio_median']:.3f}) "
            f"| {o['paths'][i]['after_first_chunk_ms_per_token']:.1f}, "
            f"{o['after_first_chunk_ratio']:.3f} "
            f"| {ttft[i]['p50']:.0f} / {ttft[i]['p90']:.0f} |"
        )
    noise = [report["overhead"][i]["direct_run_to_run_pct"] for i in INGRESSES]
    ident = report["identical"]
    met = {i: "met" if ok else "NOT met" for i, ok in report["within_5_percent"].items()}
    lines += [
        "",
        f"Aim: at most 5 % overhead: front {met['front']}, proxy {met['proxy']}. Noise to read "
        "them against: two direct runs of the same prompt differ by (median) "
        + " / ".join(_f(n, ".1f") + " %" for n in noise)
        + " in the front / proxy phase. "
        f"Tokens identical on every path: {sum(ident['per_prompt'])}/{len(ident['per_prompt'])} "
        f"prompts; under concurrency: {'yes' if ident['concurrent'] else 'NO'}.",
        "",
        f"## Concurrent clients through the front ({s['requests_per_level']} requests per level)",
        "",
        "| clients | tokens/s (aggregate) | latency p50 / p90 / max ms | first chunk p50 / p90 ms "
        "| identical |",
        "|---|---|---|---|---|",
    ]
    for lv in report["concurrency"]["levels"]:
        lat, fc = lv["latency_ms"], lv["first_chunk_ms"]
        lines.append(
            f"| {lv['clients']} | {lv['tokens_per_second']:.1f} | {lat['p50']:.0f} / "
            f"{lat['p90']:.0f} / {lat['max']:.0f} | {fc['p50']:.0f} / {fc['p90']:.0f} "
            f"| {'yes' if lv['identical_to_sequential'] else 'NO'} |"
        )
    lines += [
        "",
        f"## Cancellation ({s['cancel_trials']} trials each, {s['cancel_tokens']}-token "
        f"generations, cancelled after the first chunk; verifier Info polled every "
        f"{1e3 * s['poll_s']:.0f} ms, up to {s['free_timeout_s']:g} s)",
        "",
        "| path | how | freed | freed after p50 / max ms | call ms p50 | tokens generated |",
        "|---|---|---|---|---|---|",
    ]
    for i in PATHS:
        for label, c in report["cancellation"][i].items():
            fm = c["freed_ms"]
            lines.append(
                f"| {i} | {label.replace('_', ' ')} | {c['freed']}/{c['trials']} "
                f"| {_f(fm and fm['p50'], '.0f')} / {_f(fm and fm['max'], '.0f')} "
                f"| {c['call_ms']['p50']:.1f} | {c['tokens_generated_mean']:.0f} |"
            )
    lines += [
        "",
        f"Evidence for the front: {report['cancellation_evidence']}.",
        "",
        "ms/token: client wall time of the whole generation (prefill included) over generated "
        "tokens; 'after the first chunk': the same without the prefill and first round (the "
        "per-round relay cost alone). 'freed': the session left the verifier's Info within the "
        "limit and its record does not say finished. direct: the verifier's own client cancels "
        "its call (the floor: the round in flight ends first). 'tokens generated': what the "
        "session produced before it ended (a session not freed is then stopped with "
        "CancelSession).",
    ]
    lines += http_api.markdown_lines(report)
    if report["notes"]:
        lines += ["", "Notes:", *(f"- {n}" for n in report["notes"])]
    if plot:
        lines += ["", f"![router]({plot})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    labels, values, colors = [], [], []
    for i in INGRESSES:
        o = report["overhead"][i]
        labels += [f"direct\n({i} phase)", i]
        values += [o["paths"]["direct"]["ms_per_token"], o["paths"][i]["ms_per_token"]]
        colors += ["tab:gray", "tab:blue" if i == "front" else "tab:orange"]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    for x, i in zip((1, 3), INGRESSES, strict=True):
        pct = report["overhead_pct"][i]
        ax.text(x, values[x], f"{pct:+.1f} %", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("ms per generated token")
    ax.set_title("router overhead per token (interleaved with direct)")

    ax = axes[1]
    ttft = report["first_chunk_ms"]
    ax.bar(
        list(PATHS),
        [ttft[p]["p50"] for p in PATHS],
        yerr=[[0] * 3, [ttft[p]["p90"] - ttft[p]["p50"] for p in PATHS]],
        color=["tab:gray", "tab:blue", "tab:orange"],
        capsize=4,
    )
    ax.set_ylabel("ms (p50, bar to p90)")
    ax.set_title("time to the first chunk")

    ax = axes[2]
    lv = report["concurrency"]["levels"]
    xs = [x["clients"] for x in lv]
    ax.plot(xs, [x["tokens_per_second"] for x in lv], "o-", color="tab:blue", label="tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent clients (front)")
    ax.set_ylabel("aggregate tokens/s (circles)", color="tab:blue")
    ax.set_ylim(0, 1.2 * max(x["tokens_per_second"] for x in lv))
    ax2 = ax.twinx()
    ax2.plot(xs, [x["latency_ms"]["p50"] / 1e3 for x in lv], "s--", color="tab:red")
    ax2.set_ylabel("request latency p50, s (squares)", color="tab:red")
    ax2.set_ylim(0, 1.2 * max(x["latency_ms"]["p50"] / 1e3 for x in lv))
    ax.set_title("throughput and latency vs clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict, out: str | Path) -> list[Path]:
    from coralline.bench.report import write_single

    return write_single(report, out, markdown, plot)


def main(
    out: str | None = "bench/out/router.json",
    quick: bool = False,
    prompts: int | None = None,
    max_new_tokens: int | None = None,
    repeats: int | None = None,
    clients: Sequence[int] | None = None,
    cancel_trials: int | None = None,
    model: str | None = None,
    checkpoint: str | None = None,
    command: str = "",
) -> dict:
    given = {
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "clients": tuple(clients) if clients else None,
        "cancel_trials": cancel_trials,
        "model": model,
        "checkpoint": checkpoint,
    }
    kw = {k: v for k, v in given.items() if v is not None}
    cfg = (RouterBenchConfig.quick if quick else RouterBenchConfig)(**kw)
    report = run(cfg, command=command)
    print(markdown(report))
    if out:
        for path in write(report, out):
            print(f"wrote {display_path(Path(path).resolve())}")
    return report


__all__ = ["INGRESSES", "PATHS", "RouterBenchConfig", "main", "markdown", "plot", "run", "write"]
