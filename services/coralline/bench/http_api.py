"""`coralline bench router`, the HTTP step: the OpenAI-compatible API (`/v1/completions`,
streamed) against the gRPC API (the SDK), both through the same front and router, on the same
prompts sent as the same token ids, greedy, interleaved (G H | H G | ...); and how fast the
verifier frees a session whose HTTP client disconnects after the first chunk.

Per path: time to the first chunk that carries text (on both paths: the detokenizer may hold
a round's text back, and the HTTP API sends no event without text), tokens/s and ms/token over
whole generations (client wall time; HTTP tokens from the usage the final chunk reports), and
whether the HTTP text equals the gRPC text. The HTTP client is the standard library's
(`http.client`), reading the server-sent events as they arrive: no client library's overhead
is measured, only the server's.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass
class HttpGeneration:
    text: str
    tokens: int  # completion_tokens of the usage chunk
    seconds: float  # the whole request at the client
    first_chunk_s: float  # request start to the first event with text
    chunks: int  # events with text
    session_id: str


def _request(base_url: str, body: dict, timeout_s: float = 600.0):
    """(connection, response) of a POST to /v1/completions."""
    url = urlparse(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
    conn.request(
        "POST",
        url.path + "/completions",
        json.dumps(body),
        {"content-type": "application/json"},
    )
    resp = conn.getresponse()
    if resp.status != 200:
        detail = resp.read()[:500]
        conn.close()
        raise RuntimeError(f"HTTP {resp.status}: {detail!r}")
    return conn, resp


def _events(resp):
    """The JSON events of a server-sent-event stream, up to [DONE]."""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[len("data: ") :])


def _body(model: str, ids: Sequence[int], max_new_tokens: int, seed: int, drafter: str) -> dict:
    return {
        "model": model,
        "prompt": list(ids),
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "seed": seed,
        "drafter": drafter,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def http_generate(
    base_url: str, model: str, ids: Sequence[int], max_new_tokens: int, seed: int, drafter: str
) -> HttpGeneration:
    """One streamed completion, timed at the client."""
    t0 = time.perf_counter()
    conn, resp = _request(base_url, _body(model, ids, max_new_tokens, seed, drafter))
    sid = resp.getheader("x-coralline-session-id", "")
    texts: list[str] = []
    first, tokens = 0.0, 0
    try:
        for event in _events(resp):
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']}")
            if event.get("choices") and event["choices"][0].get("text"):
                if not texts:
                    first = time.perf_counter() - t0
                texts.append(event["choices"][0]["text"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    finally:
        conn.close()
    return HttpGeneration("".join(texts), tokens, time.perf_counter() - t0, first, len(texts), sid)


@dataclass
class GrpcGeneration:
    ids: list[int]
    text: str
    seconds: float
    first_chunk_s: float  # request start to the first chunk with text, as on the HTTP path


def grpc_generate(
    client, ids: Sequence[int], max_new_tokens: int, seed: int, drafter: str
) -> GrpcGeneration:
    """The same request through the SDK, timed the same way (the first chunk WITH TEXT: the
    detokenizer may hold a round's text back, and HTTP sends no event without text)."""
    t0 = time.perf_counter()
    out: list[int] = []
    texts: list[str] = []
    first = 0.0
    for chunk in client.stream(
        token_ids=list(ids), max_new_tokens=max_new_tokens, temperature=0.0, seed=seed,
        drafter=drafter,
    ):  # fmt: skip
        if chunk.text and not texts:
            first = time.perf_counter() - t0
        if chunk.text:
            texts.append(chunk.text)
        out.extend(chunk.token_ids)
    return GrpcGeneration(out, "".join(texts), time.perf_counter() - t0, first)


def _stats(seconds: list[float], tokens: list[int], first: list[float]) -> dict:
    from coralline.bench.router import _dist_ms

    total_s, total_tokens = sum(seconds), sum(tokens)
    return {
        "generations": len(seconds),
        "tokens": total_tokens,
        "seconds": total_s,
        "ms_per_token": 1e3 * total_s / total_tokens if total_tokens else float("nan"),
        "tokens_per_second": total_tokens / total_s if total_s > 0 else float("nan"),
        "first_chunk_ms": _dist_ms(first),
    }


def compare(cfg, base_url: str, client, encoded: list[list[int]], log) -> dict:
    """gRPC (the SDK) and HTTP on every prompt, `repeats` times each, interleaved."""
    grpc_runs: list[list[GrpcGeneration]] = [[] for _ in encoded]
    http_runs: list[list[HttpGeneration]] = [[] for _ in encoded]
    for i, ids in enumerate(encoded):
        seed = cfg.seed + i
        for r in range(cfg.repeats):
            order = ("grpc", "http") if (i + r) % 2 == 0 else ("http", "grpc")
            for path in order:
                if path == "grpc":
                    g = grpc_generate(client, ids, cfg.max_new_tokens, seed, cfg.drafter)
                    grpc_runs[i].append(g)
                else:
                    h = http_generate(
                        base_url, cfg.model, ids, cfg.max_new_tokens, seed, cfg.drafter
                    )
                    http_runs[i].append(h)
        same = all(h.text == grpc_runs[i][0].text for h in http_runs[i]) and all(
            g.ids == grpc_runs[i][0].ids for g in grpc_runs[i]
        )
        log(
            f"HTTP vs gRPC, prompt {i + 1}/{len(encoded)}: first chunk "
            f"{1e3 * grpc_runs[i][0].first_chunk_s:.0f} / {1e3 * http_runs[i][0].first_chunk_s:.0f}"
            f" ms, identical {same}"
        )
    grpc_all = [g for per in grpc_runs for g in per]
    http_all = [h for per in http_runs for h in per]
    stats = {
        "grpc": _stats(
            [g.seconds for g in grpc_all],
            [len(g.ids) for g in grpc_all],
            [g.first_chunk_s for g in grpc_all],
        ),
        "http": _stats(
            [h.seconds for h in http_all],
            [h.tokens for h in http_all],
            [h.first_chunk_s for h in http_all],
        ),
    }
    identical = [
        all(h.text == grpc_runs[i][0].text for h in http_runs[i])
        and all(g.ids == grpc_runs[i][0].ids for g in grpc_runs[i])
        for i in range(len(encoded))
    ]
    counts = [
        all(h.tokens == len(grpc_runs[i][0].ids) for h in http_runs[i]) for i in range(len(encoded))
    ]
    return {
        "paths": stats,
        "ms_per_token_ratio": stats["http"]["ms_per_token"] / stats["grpc"]["ms_per_token"],
        "first_chunk_p50_ratio": stats["http"]["first_chunk_ms"]["p50"]
        / stats["grpc"]["first_chunk_ms"]["p50"],
        "identical_text": identical,
        "usage_equals_grpc_tokens": counts,
    }


def disconnect_trials(cfg, base_url: str, direct, ids: list[int], log) -> dict:
    """A long streamed completion whose client closes the connection after the first chunk
    with text: how long until the verifier no longer holds its session."""
    from coralline.bench.router import _dist_ms, _wait_freed

    trials = []
    for k in range(cfg.cancel_trials):
        body = _body(cfg.model, ids, cfg.cancel_tokens, cfg.seed + k, cfg.drafter)
        conn, resp = _request(base_url, body)
        sid = resp.getheader("x-coralline-session-id", "")
        for event in _events(resp):
            if event.get("choices") and event["choices"][0].get("text"):
                break
        running = sid in direct.info().session_ids
        t0 = time.perf_counter()
        conn.close()  # the client goes away mid-stream
        freed_s, polls = _wait_freed(direct, sid, t0, cfg.free_timeout_s, cfg.poll_s)
        if freed_s is None:  # stop it so the next trial starts clean
            direct.cancel(sid)
            _wait_freed(direct, sid, time.perf_counter(), 60.0, cfg.poll_s)
        trials.append(
            {
                "session_id": sid,
                "running_at_disconnect": running,
                "freed": freed_s is not None,
                "freed_ms": None if freed_s is None else 1e3 * freed_s,
                "info_polls": polls,
            }
        )
        freed = f"freed in {1e3 * freed_s:.0f} ms" if freed_s is not None else "NOT freed"
        log(f"HTTP disconnect {k + 1}/{cfg.cancel_trials}: {freed}")
    freed = [t["freed_ms"] / 1e3 for t in trials if t["freed"]]
    return {
        "trials": len(trials),
        "freed": len(freed),
        "freed_ms": _dist_ms(freed),
        "freed_within_1s": sum(f < 1.0 for f in freed),
        "per_trial": trials,
    }


def markdown_lines(report: dict) -> list[str]:
    """The HTTP section of the router bench's markdown."""
    h = report.get("http")
    if not h:
        return []
    g, w = h["paths"]["grpc"], h["paths"]["http"]
    d = h["disconnect"]
    fm = d["freed_ms"] or {}
    same = sum(h["identical_text"])
    lines = [
        "",
        "## The HTTP API against the gRPC API (the same front and router, interleaved)",
        "",
        "| path | tokens/s | ms/token | first chunk with text p50 / p90 ms |",
        "|---|---|---|---|",
    ]
    for name, s in (("gRPC (SDK)", g), ("HTTP (/v1/completions, SSE)", w)):
        fc = s["first_chunk_ms"]
        lines.append(
            f"| {name} | {s['tokens_per_second']:.1f} | {s['ms_per_token']:.1f} "
            f"| {fc['p50']:.0f} / {fc['p90']:.0f} |"
        )
    p50 = "-" if not fm else f"{fm['p50']:.0f}"
    worst = "-" if not fm else f"{fm['max']:.0f}"
    lines += [
        "",
        f"HTTP over gRPC: ms/token x{h['ms_per_token_ratio']:.3f}, first chunk p50 "
        f"x{h['first_chunk_p50_ratio']:.3f}. Text identical to the gRPC text: "
        f"{same}/{len(h['identical_text'])} prompts; usage = gRPC token count: "
        f"{sum(h['usage_equals_grpc_tokens'])}/{len(h['usage_equals_grpc_tokens'])}. "
        f"A client disconnecting after the first chunk: freed {d['freed']}/{d['trials']} "
        f"(within 1 s: {d['freed_within_1s']}), after p50 {p50} ms / max {worst} ms.",
    ]
    return lines
