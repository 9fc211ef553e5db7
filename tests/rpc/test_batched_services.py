"""The services under load, end to end on the real target: a batched verifier (the default) and
a pipelined drafter (`coralline drafter --pipeline`) in separate OS processes. Four concurrent
clients with different prompts: each output is the target's own greedy output; the drafter's
speculation cache answered Commits (hits on its /metrics), its batched drafting served several
sessions per head call, and the verifier's rounds carried the
load-adaptive cost hint (its batches held several sessions)."""

import threading
import urllib.request

import pytest

from coralline.client import Client
from coralline.engine import Engine, generate_ids
from coralline.sampling import SamplingParams

from .servers import ServerProcess

PROMPTS = [
    "Write a haiku about the sea.",
    "List three uses of a paperclip, one per line.",
    "请用三句话介绍一下长城。",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def services():
    drafter = ServerProcess("drafter", "--pipeline", "--metrics-port", "0")
    try:
        verifier = ServerProcess(  # every round speculates: the mechanics are tested here
            "verifier", "--drafter-endpoint", drafter.address, "--metrics-port", "0",
            "--speculation", "budget",
        )  # fmt: skip
    except Exception:
        drafter.stop()
        raise
    yield drafter, verifier
    codes = (verifier.stop(), drafter.stop())
    assert codes == (0, 0), (codes, verifier.stderr()[-2000:], drafter.stderr()[-2000:])


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.mark.slow
def test_concurrent_sessions_through_batched_and_pipelined_services(services, smollm2):
    drafter, verifier = services
    params = SamplingParams(max_new_tokens=40)
    want = [generate_ids(Engine(smollm2), smollm2.encode(p), params) for p in PROMPTS]
    got: list = [None] * len(PROMPTS)
    errors: list = []

    def run(k: int) -> None:
        try:
            with Client(verifier.address, timeout=300) as client:
                got[k] = client.generate(PROMPTS[k], max_new_tokens=40).token_ids
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert got == want
    hits = _metric(drafter.metrics_url, 'coralline:drafter_speculation_cache_total{outcome="hit"}')
    assert hits > 0
    # the drafter batched the sessions' steps (draft/batch.py): calls served several sessions
    assert _metric(drafter.metrics_url, "coralline:drafter_batch_steps_sum") > _metric(
        drafter.metrics_url, "coralline:drafter_batch_steps_count"
    )
    assert _metric(verifier.metrics_url, "coralline:batch_sessions_count") > 0
    # some batches held more than one session's round
    assert _metric(verifier.metrics_url, "coralline:batch_sessions_sum") > _metric(
        verifier.metrics_url, "coralline:batch_sessions_count"
    )


@pytest.mark.slow
def test_ignore_eos_goes_past_eos_through_the_services(services, smollm2):
    """`ignore_eos`: the generation goes on past the target's EOS to max_new_tokens (what the
    load bench asks of every method), still the target's own greedy tokens."""
    _, verifier = services
    prompts = PROMPTS[:2]  # their greedy answers end with EOS within 40 tokens
    params = SamplingParams(max_new_tokens=56, ignore_eos=True)
    want = [generate_ids(Engine(smollm2), smollm2.encode(p), params) for p in prompts]
    assert all(len(w) == 56 and set(w[:-1]) & smollm2.eos_token_ids for w in want)
    got: list = [None] * len(prompts)

    def run(k: int) -> None:
        with Client(verifier.address, timeout=300) as client:
            got[k] = client.generate(prompts[k], max_new_tokens=56, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert [r.token_ids for r in got] == want
    assert {r.finish_reason for r in got} == {"length"}
