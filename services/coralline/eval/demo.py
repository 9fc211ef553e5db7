"""`make demo`: one prompt on SmolLM2, streamed with speculation, beside plain decoding of the
same prompt measured in the same process (same model, same thread count). Prints both texts'
equality, tokens/s, acceptance length and the speedup. Knows nothing about gRPC or services.
"""

from __future__ import annotations

import sys
import time

import torch

DEFAULT_PROMPT = (
    "Copy this Python function exactly, then add a one-line docstring to it:\n\n"
    "def moving_average(values, window):\n"
    "    result = []\n"
    "    for i in range(len(values) - window + 1):\n"
    "        chunk = values[i:i + window]\n"
    "        result.append(sum(chunk) / window)\n"
    "    return result\n"
)


def run(prompt: str | None, max_new_tokens: int, drafter: str | None) -> None:
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
    (plain, _, wp), (spec, _, ws) = results.values()
    print(
        f"{'':<28}{'tokens':>8}{'rounds':>8}{'tau':>8}{'tok/s':>9}{'draft ms':>10}{'verify ms':>11}"
    )
    for label, (_, s, w) in results.items():
        print(
            f"{label:<28}{s.tokens:>8}{s.rounds:>8}{s.acceptance_length:>8.2f}"
            f"{s.tokens / w:>9.1f}{s.draft_ms:>10.0f}{s.verify_ms:>11.0f}"
        )
    same = "identical" if plain == spec else "DIFFERENT (a bug: please report it)"
    print(f"\noutputs: {same}; speedup {wp / ws:.2f}x (wall time, same process, one thread)")
    if plain != spec:
        sys.exit(1)
