"""`make demo`: the whole pipeline on this machine. The stack comes up (a drafter process, a
verifier process, the Ray Serve router, the public port on loopback); one prompt is streamed
through the client SDK with speculation (CORAL drafter), then the same prompt with plain
decoding through the same stack; their outputs are compared, the round stats and the speedup
printed; the same prompt goes once more through the OpenAI-compatible HTTP API (a streamed
chat completion, read with the standard library) and must give the same text; the stack goes
down. `--in-process` runs the same comparison in this process without
any server (the engine alone).

Knows nothing about the algorithms: it starts things and prints what they report.
"""

from __future__ import annotations

import sys
import time

DEFAULT_PROMPT = (
    "Copy this Python function exactly, then add a one-line docstring to it:\n\n"
    "def moving_average(values, window):\n"
    "    result = []\n"
    "    for i in range(len(values) - window + 1):\n"
    "        chunk = values[i:i + window]\n"
    "        result.append(sum(chunk) / window)\n"
    "    return result\n"
)

_HEADER = (
    f"{'':<28}{'tokens':>8}{'rounds':>8}{'tau':>8}{'tok/s':>9}{'draft ms':>10}{'verify ms':>11}"
)


def _row(label: str, s, wall_s: float) -> str:
    return (
        f"{label:<28}{s.tokens:>8}{s.rounds:>8}{s.acceptance_length:>8.2f}"
        f"{s.tokens / wall_s:>9.1f}{s.draft_ms:>10.0f}{s.verify_ms:>11.0f}"
    )


def _verdict(plain: list[int], spec: list[int], wall_plain: float, wall_spec: float, where: str):
    same = "identical" if plain == spec else "DIFFERENT (a bug: please report it)"
    print(f"\noutputs: {same}; speedup {wall_plain / wall_spec:.2f}x ({where})")
    if plain != spec:
        sys.exit(1)


def run_stack(prompt: str | None, max_new_tokens: int, drafter: str | None) -> None:
    from coralline.client import Client
    from coralline.router.stack import Stack, StackConfig

    prompt = prompt or DEFAULT_PROMPT
    drafter = drafter or "coral"
    print("starting the stack: 1 drafter, 1 verifier, the Ray Serve router (loopback)...")
    t0 = time.perf_counter()
    stack = Stack(StackConfig(port=0, http_port=0, dashboard_port=0))
    stack.start()
    try:
        print(f"stack up in {time.perf_counter() - t0:.1f} s")
        for line in stack.describe():
            print(line)
        print(f"\nprompt:\n{prompt}\n", flush=True)
        results, texts = {}, {}
        modes = (("plain (through the stack)", "none"), (f"speculative ({drafter})", drafter))
        with Client(stack.address) as client:
            for label, name in modes:
                print(f"--- {label} ---", flush=True)
                t = time.perf_counter()
                ids, rounds, summary = [], [], None
                for chunk in client.stream(prompt, max_new_tokens=max_new_tokens, drafter=name):
                    print(chunk.text, end="", flush=True)
                    texts[label] = texts.get(label, "") + chunk.text
                    ids.extend(chunk.token_ids)
                    if chunk.stats is not None:
                        rounds.append(chunk.stats)
                    summary = chunk.summary or summary
                wall = time.perf_counter() - t
                print("\n", flush=True)
                results[label] = (ids, summary, wall, rounds)
        print(_HEADER)
        for label, (_, s, wall, _) in results.items():
            print(_row(label, s, wall))
        _, _, _, spec_rounds = results[f"speculative ({drafter})"]
        print("\nspeculative rounds (tree nodes -> accepted drafts, draft ms / verify ms):")
        print(
            "  "
            + "  ".join(
                f"{r.tree_nodes}->{r.accepted} ({r.draft_ms:.0f}/{r.verify_ms:.0f})"
                for r in spec_rounds[:12]
            )
            + ("  ..." if len(spec_rounds) > 12 else "")
        )
        (plain, _, wp, _), (spec, _, ws, _) = results.values()
        _verdict(plain, spec, wp, ws, "wall time at the client, same stack")
        _http_chat(stack.http_url, prompt, max_new_tokens, texts[f"speculative ({drafter})"])
    finally:
        print("stopping the stack...", flush=True)
        stack.stop()


def _http_chat(base_url: str, prompt: str, max_new_tokens: int, want: str) -> None:
    """The same prompt as a streamed OpenAI chat completion (what curl or the openai client
    would send), printed as it arrives; its text must equal the gRPC API's."""
    import http.client
    import json
    from urllib.parse import urlparse

    url = urlparse(base_url)
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "stream": True,
    }
    print(f"--- the OpenAI-compatible HTTP API: POST {base_url}/chat/completions ---", flush=True)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    conn.request("POST", url.path + "/chat/completions", json.dumps(body))
    resp = conn.getresponse()
    parts, spec = [], {}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        delta = event["choices"][0]["delta"].get("content") if event.get("choices") else None
        if delta:
            parts.append(delta)
            print(delta, end="", flush=True)
        spec = event.get("spec_decode", spec)
    conn.close()
    same = "identical to" if "".join(parts) == want else "DIFFERENT from (a bug: please report it)"
    print(f"\n\nHTTP text {same} the gRPC API's; spec_decode: {json.dumps(spec)}")
    if "".join(parts) != want:
        sys.exit(1)


def run_in_process(prompt: str | None, max_new_tokens: int, drafter: str | None) -> None:
    import torch

    from coralline.draft.registry import check_name, default_drafter, make_drafter
    from coralline.engine import Engine
    from coralline.sampling import SamplingParams
    from coralline.target import TargetRunner

    torch.set_num_threads(1)  # both runs on one thread: the comparison is like for like
    prompt = prompt or DEFAULT_PROMPT
    target = TargetRunner.load()
    drafter = drafter or default_drafter(target.config.model)
    check_name(drafter)
    ids = target.encode(prompt)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    print(f"prompt ({len(ids)} tokens):\n{prompt}\n", flush=True)
    results = {}
    for label, d in (("plain", None), (f"speculative ({drafter})", make_drafter(drafter, target))):
        engine = Engine(target, d)
        print(f"--- {label} ---", flush=True)
        t0 = time.perf_counter()
        tokens, summary = [], None
        for chunk in engine.generate(ids, params):
            print(chunk.text, end="", flush=True)
            tokens.extend(chunk.token_ids)
            summary = chunk.summary or summary
        wall = time.perf_counter() - t0
        print("\n", flush=True)
        results[label] = (tokens, summary, wall)
    print(_HEADER)
    for label, (_, s, w) in results.items():
        print(_row(label, s, w))
    (plain, _, wp), (spec, _, ws) = results.values()
    _verdict(plain, spec, wp, ws, "wall time, same process, one thread")
