"""Sampling is lossless end to end: a tiny random Llama target (V = 8), a perturbed copy as the
draft model building trees WITHOUT replacement, the real engine (tree forward, warping,
verification, KV commit, drafter sync). The law of the first 2 generated tokens must match the
target's exact law (chi-square, alpha = 1e-3, Bonferroni across the cases), at T = 1 and at
T = 0.7 with top-p 0.8, for traversal and RRSw. A broken verifier fails the same test.
These runs speculate from the first round (`fused_first_round=False`), so both tokens come from
one speculative round; the default, whose first token comes from the prompt's own forward, is
tested on the first 3 tokens (the second and third from a speculative round).
"""

import itertools
from collections import Counter
from functools import partial

import pytest
import torch
from scipy import stats

from coralline.draft.coral import CoralHead, config_for_target
from coralline.draft.coral_drafter import CoralDrafter, CoralDrafterConfig
from coralline.draft.model import ModelDrafter, ModelDrafterConfig
from coralline.engine import Engine, EngineConfig
from coralline.sampling import SamplingParams, warp
from coralline.target import TargetRunner
from coralline.verification import VERIFIERS, VerifierSpec
from coralline.verification.traversal import verify_traversal

from .tiny import perturbed, tiny_llama
from .verification.test_exact import BonusFromOriginalRow

VOCAB, LENGTH, RUNS = 8, 2, 2000  # the broken control still fails at p ~ 1e-47
ALPHA = 1e-3 / 12  # Bonferroni across the 12 positive cases of this file
PROMPT = [1, 6, 3]


def _exact_law(model, params: SamplingParams, length: int = LENGTH) -> dict[tuple[int, ...], float]:
    """P(first `length` tokens) under the warped target, by enumerating every prefix."""
    law = {}
    with torch.no_grad():
        for seq in itertools.product(range(VOCAB), repeat=length):
            ids = torch.tensor([PROMPT + list(seq[:-1])])
            logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 :]  # [length, V]
            probs = warp(logits, params.temperature, params.top_k, params.top_p).double()
            p = 1.0
            for j, tok in enumerate(seq):
                p *= float(probs[j, tok])
            if p > 0:
                law[seq] = p
    return law


def _chi2(counts: Counter, law: dict, runs: int) -> float:
    assert set(counts) <= set(law), "generated a sequence the target cannot produce"
    keys = sorted(law)
    exp = [runs * law[k] for k in keys]
    obs = [counts.get(k, 0) for k in keys]
    big = [i for i, e in enumerate(exp) if e >= 20]
    small = [i for i, e in enumerate(exp) if e < 20]
    e = [exp[i] for i in big] + ([sum(exp[i] for i in small)] if small else [])
    o = [obs[i] for i in big] + ([sum(obs[i] for i in small)] if small else [])
    scale = sum(o) / sum(e)
    return float(stats.chisquare(o, [x * scale for x in e]).pvalue)


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(VOCAB, seed=21, scale=3.0)
    draft = perturbed(target, 0.4, seed=22)
    return target, draft


def _drafter(kind, models):
    target_model, draft_model = models
    if kind == "none":
        return None
    if kind == "draft-model":
        return ModelDrafter(
            TargetRunner(draft_model, None), ModelDrafterConfig(branching=(3, 2), draft_top_k=6)
        )
    torch.manual_seed(5)
    cfg = config_for_target(target_model, "tiny", num_groups=4, active_groups=2)
    head = CoralHead(cfg).attach(target_model)
    head.init_groups()
    config = CoralDrafterConfig(
        depth=2,
        max_nodes=8,
        budget="max",
        draft_top_k=6,
        grouped=kind in ("coral-grouped", "coral-chain"),
        chain=kind == "coral-chain",
    )
    return CoralDrafter(head, config)


def _run(models, verifier, params, drafter_kind="draft-model", fused=False, length=LENGTH):
    target = TargetRunner(models[0], None)
    drafter = _drafter(drafter_kind, models)
    engine = Engine(target, drafter, EngineConfig(verifier=verifier, fused_first_round=fused))
    counts: Counter = Counter()
    accepted = 0
    for seed in range(RUNS):
        p = SamplingParams(
            temperature=params.temperature, top_p=params.top_p, seed=seed, max_new_tokens=length
        )
        chunks = list(engine.generate(PROMPT, p))
        counts[tuple(t for c in chunks for t in c.token_ids)] += 1
        accepted += sum(c.stats.accepted for c in chunks)
    return counts, accepted


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8)]


@pytest.mark.slow
@pytest.mark.parametrize("verifier", ["traversal", "rrsw"])
@pytest.mark.parametrize("params", PARAMS, ids=["T1", "T0.7-topp0.8"])
def test_engine_sampling_matches_the_target_law(models, verifier, params):
    counts, accepted = _run(models, verifier, params)
    assert sum(counts.values()) == RUNS
    assert accepted > RUNS // 4  # drafts really get accepted: speculation is exercised
    p = _chi2(counts, _exact_law(models[0], params), RUNS)
    assert p > ALPHA, f"{verifier} {params}: chi-square p = {p:.2e}"


@pytest.mark.slow
def test_the_fused_first_round_is_lossless(models):
    """The default engine: the first token from the prompt's own forward (a plain round), the
    next ones from a speculative round, against the exact law of the first 3 tokens."""
    params = PARAMS[0]
    counts, accepted = _run(models, "traversal", params, fused=True, length=3)
    assert accepted > RUNS // 4
    p = _chi2(counts, _exact_law(models[0], params, 3), RUNS)
    assert p > ALPHA, f"fused first round: chi-square p = {p:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("drafter", "verifier", "params"),
    [
        ("coral", "traversal", PARAMS[0]),
        ("coral-grouped", "traversal", PARAMS[1]),
        ("coral", "rrsw", PARAMS[1]),
        ("coral-chain", "token_level", PARAMS[0]),
        ("coral-chain", "block", PARAMS[1]),
    ],
    ids=[
        "coral-traversal-T1",
        "coral-grouped-traversal-topp",
        "coral-rrsw-topp",
        "coral-chain-token_level-T1",
        "coral-chain-block-topp",
    ],
)
def test_coral_drafter_with_sampled_trees_is_lossless(models, drafter, verifier, params):
    """The whole CORAL drafter (template trees, SWOR children, truncated and grouped draft
    rows) + verifier + engine, against the exact target law."""
    counts, accepted = _run(models, verifier, params, drafter)
    assert accepted > RUNS // 10  # drafts get accepted even from an untrained head
    p = _chi2(counts, _exact_law(models[0], params), RUNS)
    assert p > ALPHA, f"{drafter}/{verifier}: chi-square p = {p:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("params", PARAMS, ids=["T1", "T0.7-topp0.8"])
def test_plain_sampling_matches_the_target_law(models, params):
    """No drafter at T > 0: the same engine samples the target's warped rows."""
    counts, accepted = _run(models, None, params, "none")
    assert accepted == 0
    p = _chi2(counts, _exact_law(models[0], params), RUNS)
    assert p > ALPHA, f"plain sampling {params}: chi-square p = {p:.2e}"


@pytest.mark.slow
def test_broken_verifier_fails_the_engine_test(models, monkeypatch):
    broken = VerifierSpec(
        partial(verify_traversal, impl=BonusFromOriginalRow), "sampled_swor", needs_draft=True
    )
    monkeypatch.setitem(VERIFIERS, "traversal", broken)
    params = PARAMS[0]
    counts, _ = _run(models, "traversal", params)
    p = _chi2(counts, _exact_law(models[0], params), RUNS)
    assert p < ALPHA, f"the broken traversal passed (p = {p:.3g})"
