"""The batched path is lossless at T > 0: the law of the first 2 generated tokens through a
batch scheduler shared by 4 concurrent sessions (so every forward is a ragged batch of several
sessions' trees and prompts) equals the target's exact law (chi-square, the setting and helpers
of tests/test_engine_lossless.py: tiny random Llama V = 8, a perturbed draft model building
trees without replacement, traversal verification). Each session keeps its own keyed coins."""

import threading
from collections import Counter

import pytest

from coralline.batching.scheduler import BatchConfig, pooled
from coralline.engine import Engine, EngineConfig
from coralline.sampling import SamplingParams
from coralline.target import TargetRunner

from ..test_engine_lossless import ALPHA, LENGTH, PARAMS, PROMPT, _chi2, _drafter, _exact_law
from ..test_engine_lossless import models as models

RUNS = 2000  # generations through the shared path (the in-process test runs 2000)

THREADS = 4


def _run_batched(models, params):
    root = pooled(TargetRunner(models[0], None), BatchConfig(slots=THREADS, max_wait_ms=2))
    counts: Counter = Counter()
    accepted = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        engine = Engine(root.fork(), _drafter("draft-model", models), EngineConfig("traversal"))
        for seed in range(k, RUNS, THREADS):
            p = SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                seed=seed,
                max_new_tokens=LENGTH,
            )
            chunks = list(engine.generate(PROMPT, p))
            with lock:
                counts[tuple(t for c in chunks for t in c.token_ids)] += 1
                accepted[0] += sum(c.stats.accepted for c in chunks)
        engine.target.reset()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, accepted[0], root.kv.scheduler.stats


@pytest.mark.slow
@pytest.mark.parametrize("params", PARAMS[1:], ids=["T0.7-topp0.8"])
def test_batched_sampling_matches_the_target_law(models, params):
    counts, accepted, stats = _run_batched(models, params)
    assert sum(counts.values()) == RUNS
    assert accepted > RUNS // 4  # speculation is exercised
    assert max(stats.sessions_hist) >= 2  # forwards really were shared by sessions
    p = _chi2(counts, _exact_law(models[0], params), RUNS)
    assert p > ALPHA, f"batched {params}: chi-square p = {p:.2e}"
