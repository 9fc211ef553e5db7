"""Sampling stays lossless through the split path: the engine's chi-square test (tests/
test_engine_lossless.py) run through the drafter and verifier services on a tiny random Llama:
the law of the first 2 generated tokens over 1200 seeds (T = 0.7, top-p 0.8) matches the
target's exact law."""

import dataclasses
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from coralline.rpc.protos import verifier_pb2
from coralline.sampling import SamplingParams

from ..test_engine_lossless import LENGTH, PROMPT, _chi2, _exact_law
from ..tiny import tiny_llama

RUNS = 1200  # generations through the shared path (the in-process test runs 2000)

ALPHA = 1e-3


def _sample(stack, params: SamplingParams, seed: int) -> tuple[tuple[int, ...], int, int]:
    req = verifier_pb2.VerifyRequest(prompt_ids=PROMPT, max_new_tokens=LENGTH)
    req.sampling.temperature = params.temperature
    if params.top_p < 1:
        req.sampling.top_p = params.top_p
    req.sampling.seed = seed
    ids, accepted, fallbacks = [], 0, 0
    for chunk in stack.ver.Generate(req, timeout=60):
        ids += chunk.token_ids
        accepted += chunk.stats.accepted
        fallbacks += bool(chunk.stats.fallback)
    return tuple(ids), accepted, fallbacks


@pytest.mark.slow
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.7, top_p=0.8)], ids=["T0.7-topp0.8"]
)  # the warped case (T = 1 is covered in-process by test_engine_lossless.py; ~70 s per case)
def test_sampling_through_the_services_matches_the_target_law(tiny_stack, params, monkeypatch):
    # the law is what is tested here, not the drafter's deadline: the shared stack's 0.5 s
    # round deadline (short for its hang tests) was missed by several sessions at once in two
    # CI runs, late in a long pytest process (a stall of the whole process, not of one
    # session), which turned those rounds into plain fallbacks; give the drafter time
    patient = dataclasses.replace(tiny_stack.core.config, round_timeout_s=5.0, open_timeout_s=10.0)
    monkeypatch.setattr(tiny_stack.core, "config", patient)
    with ThreadPoolExecutor(8) as pool:  # concurrent sessions, batched as in serving
        results = list(pool.map(lambda s: _sample(tiny_stack, params, s), range(RUNS)))
    counts = Counter(r[0] for r in results)
    accepted = sum(r[1] for r in results)
    assert sum(r[2] for r in results) == 0  # every round verified a real remote proposal
    assert accepted > RUNS // 10  # drafts were accepted: speculation was exercised
    law = _exact_law(tiny_llama(8, seed=21, scale=3.0), params)
    p = _chi2(counts, law, RUNS)
    assert p > ALPHA, f"split path {params}: chi-square p = {p:.2e}"
