"""The shipped CORAL head on the real target (SmolLM2-135M-Instruct)."""

import pytest
import torch

from coralline.bench.coral import heldout_prompts, router_hit_rate
from coralline.draft.coral import CoralHead
from coralline.draft.registry import make_drafter, shipped_head
from coralline.engine import Engine, generate_ids
from coralline.sampling import SamplingParams

from ..test_engine import PROMPTS, _hf_greedy


def test_a_head_ships_for_the_default_target():
    path = shipped_head("smollm2-135m-instruct")
    assert path is not None
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size < 15 * 2**20


def test_the_drafter_runs_its_head_on_onednn_and_computes_what_the_trained_head_does(smollm2):
    """make_drafter swaps the CPU fp32 head's nn.Linear layers for oneDNN's (blocked weights,
    as the target's); the head computes what the head as trained (nn.Linear) does."""
    from torch import nn

    from coralline.cpu_linear import OneDnnLinear

    fast = make_drafter("coral", smollm2).head
    assert not any(isinstance(m, nn.Linear) for m in fast.modules())
    swapped = [m for m in fast.modules() if isinstance(m, OneDnnLinear)]
    assert len(swapped) >= 9 and {m.layout for m in swapped} == {"blocked"}  # fc, q k v o,
    # gate up down, the router's two
    ref = CoralHead.load(str(shipped_head("smollm2-135m-instruct"))).attach(smollm2.model)
    g = torch.Generator().manual_seed(0)
    d = ref.config.hidden_size
    for n in (1, 5):
        ids = torch.randint(0, smollm2.vocab_size, (1, n), generator=g)
        feats = torch.randn(1, n, d, generator=g)
        pos = torch.arange(n)[None]
        with torch.inference_mode():
            got, want = fast(ids, feats, pos), ref(ids, feats, pos)
            assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
            assert torch.allclose(fast.router_logits(got[0]), ref.router_logits(got[0]), atol=1e-4)


_REFERENCES: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coral", "coral-nolookup", "coral-eagle2-lookup", "coral-chain"])
def test_greedy_with_coral_equals_target_greedy(smollm2, name):
    drafter = make_drafter(name, smollm2)
    taus = []
    for prompt in PROMPTS[:3] + PROMPTS[3:4]:
        ids = smollm2.encode(prompt)
        key = (prompt, 48)
        if key not in _REFERENCES:  # HF greedy once per prompt, for every drafter
            _REFERENCES[key] = _hf_greedy(smollm2, ids, 48)
        reference = _REFERENCES[key]
        chunks = list(Engine(smollm2, drafter).generate(ids, SamplingParams(max_new_tokens=48)))
        assert [t for c in chunks for t in c.token_ids] == reference, prompt
        taus.append(chunks[-1].summary.acceptance_length)
    assert max(taus) > 1.1  # the trained head drafts (an untrained one gives 1.0)


@pytest.mark.slow
def test_router_selects_the_target_argmax_group_on_heldout_text(smollm2):
    head = CoralHead.load(str(shipped_head("smollm2-135m-instruct"))).attach(smollm2.model)
    prompts = heldout_prompts(smollm2.tokenizer, 4)
    ids = [smollm2.encode(p) for p in prompts]
    share = router_hit_rate(head, smollm2, ids)
    chance = head.config.active_groups / head.config.num_groups
    assert share > 2 * chance, share  # measured in the README; far above chance


@pytest.mark.slow
def test_sampled_coral_generation_is_deterministic_for_a_seed(smollm2):
    drafter = make_drafter("coral", smollm2)
    ids = smollm2.encode(PROMPTS[0])
    p = SamplingParams(temperature=1.0, seed=3, max_new_tokens=24)
    a = generate_ids(Engine(smollm2, drafter), ids, p)
    b = generate_ids(Engine(smollm2, drafter), ids, p)
    assert a == b and len(a) > 0
    assert torch.tensor(a).max() < smollm2.vocab_size


@pytest.mark.slow
def test_paired_lm_head_timing_measures_both_heads_without_changing_the_output(smollm2):
    from coralline.bench.coral import lm_head_paired

    head = CoralHead.load(str(shipped_head("smollm2-135m-instruct"))).attach(smollm2.model)
    ids = [smollm2.encode(PROMPTS[0])]
    params = SamplingParams(max_new_tokens=24)
    r = lm_head_paired(smollm2, head, ids, params)
    assert r["rounds"] > 0 and r["grouped_ms_per_round"] > 0 and r["full_ms_per_round"] > 0
    plain = make_drafter("coral", smollm2)
    shadowed = make_drafter("coral", smollm2)
    shadowed.shadow_full_head = True
    a = generate_ids(Engine(smollm2, plain), ids[0], params)
    b = generate_ids(Engine(smollm2, shadowed), ids[0], params)
    assert a == b and shadowed.full_lm_head_ms > 0 and plain.full_lm_head_ms == 0
