"""Engine: greedy speculation == the target's own greedy decoding; stopping rules; input errors."""

import json
import subprocess
import sys

import pytest
import torch

from coralline.draft.model import ModelDrafter, ModelDrafterConfig
from coralline.draft.ngram import NgramConfig, NgramDrafter
from coralline.engine import Engine, EngineConfig, generate_ids
from coralline.sampling import SamplingParams
from coralline.target import TargetRunner

from .tiny import perturbed, tiny_runner

PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List five fruits and their colours, one per line.",
    "请用三句话介绍一下长城。",
    "把下面这句话翻译成英文：我今天很高兴见到你。",
]


def _hf_greedy(runner: TargetRunner, ids: list[int], n: int) -> list[int]:
    out = runner.model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=None
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculation_equals_hf_greedy_on_smollm2(smollm2, prompt):
    ids = smollm2.encode(prompt)
    reference = _hf_greedy(smollm2, ids, 64)
    params = SamplingParams(max_new_tokens=64)
    drafters = [None, NgramDrafter(), NgramDrafter(NgramConfig(min_ngram=1, max_paths=4))]
    for drafter in drafters:
        got = generate_ids(Engine(smollm2, drafter), ids, params)
        assert got == reference, (drafter and drafter.name, prompt)


def test_plain_and_draft_model_greedy_equal_hf_on_a_tiny_model():
    target = tiny_runner(vocab=16, seed=3, scale=4.0)
    draft = TargetRunner(perturbed(target.model, 0.3, seed=4), None)
    ids = [1, 5, 9, 2]
    reference = _hf_greedy(target, ids, 30)
    params = SamplingParams(max_new_tokens=30)
    assert generate_ids(Engine(target), ids, params) == reference
    drafter = ModelDrafter(draft, ModelDrafterConfig(branching=(3, 2, 1)))
    assert generate_ids(Engine(target, drafter), ids, params) == reference


@pytest.mark.parametrize("kv", ["dynamic", "pooled"])
def test_the_fused_first_round_equals_the_reference_and_saves_a_forward(kv):
    """The first token from the prompt's own forward: greedy output equal to the first round
    as a round like the others (with a drafter, and plain), plain sampling equal for a seed
    (the same keyed coins), the first chunk one token long, one target forward fewer."""
    target = tiny_runner(vocab=16, seed=3, scale=4.0, kv=kv)
    draft = TargetRunner(perturbed(target.model, 0.3, seed=4), None)
    ids = [1, 5, 9, 2, 7]
    forwards = []
    inner = target.kv.forward
    target.kv.forward = lambda *a, **kw: forwards.append(1) or inner(*a, **kw)

    def run(fused, drafter, params):
        forwards.clear()
        engine = Engine(target, drafter, EngineConfig(fused_first_round=fused))
        chunks = list(engine.generate(ids, params))
        return [t for c in chunks for t in c.token_ids], chunks, len(forwards)

    greedy = SamplingParams(max_new_tokens=20)
    for drafter in (None, ModelDrafter(draft, ModelDrafterConfig(branching=(2, 1)))):
        (a, ca, fa), (b, cb, fb) = run(True, drafter, greedy), run(False, drafter, greedy)
        assert a == b == _hf_greedy(target, ids, 20)
        assert len(ca[0].token_ids) == 1 and ca[0].stats.tree_nodes == 1
        assert not ca[0].stats.plain and ca[-1].summary.plain_rounds == 0
        if drafter is None:  # the same rounds, the first one without a forward of its own
            assert fa == fb - 1 and len(ca) == len(cb)
    sampled = SamplingParams(temperature=1.0, seed=7, max_new_tokens=12)
    assert run(True, None, sampled)[0] == run(False, None, sampled)[0]


def test_eos_inside_an_accepted_path_truncates_the_round():
    target = tiny_runner(vocab=16, seed=5, scale=4.0)
    ids = [2, 4, 6]
    reference = _hf_greedy(target, ids, 12)
    eos = reference[4]
    first = reference.index(eos)
    target.eos_token_ids = frozenset({eos})
    # a perfect draft (the target itself) accepts whole chains: EOS lands inside a path
    drafter = ModelDrafter(TargetRunner(target.model, None), ModelDrafterConfig(branching=(1,) * 8))
    # the first round speculating (these tiny models repeat the prompt's last token, so EOS is
    # the first token: a fused first round would emit it alone, with nothing to cut)
    engine = Engine(target, drafter, EngineConfig(fused_first_round=False))
    chunks = list(engine.generate(ids, SamplingParams(max_new_tokens=50)))
    got = [t for c in chunks for t in c.token_ids]
    assert got == reference[: first + 1]
    assert chunks[-1].summary.finish_reason == "eos"
    assert any(c.stats.accepted > len(c.token_ids) - 1 for c in chunks)  # a round was cut
    assert target.num_cached == len(ids) + len(got) - 1


def test_ignore_eos_goes_on_past_eos_with_the_targets_own_tokens():
    target = tiny_runner(vocab=16, seed=5, scale=4.0)
    ids = [2, 4, 6]
    reference = _hf_greedy(target, ids, 20)  # the tiny model has no EOS: its whole continuation
    target.eos_token_ids = frozenset({reference[4]})
    drafter = ModelDrafter(TargetRunner(target.model, None), ModelDrafterConfig(branching=(1,) * 8))
    for d in (None, drafter):  # plain, and EOS inside accepted paths
        params = SamplingParams(max_new_tokens=20, ignore_eos=True)
        chunks = list(Engine(target, d).generate(ids, params))
        assert [t for c in chunks for t in c.token_ids] == reference
        assert chunks[-1].summary.finish_reason == "length"
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=1)


def test_max_new_tokens_and_summary():
    target = tiny_runner(vocab=16, seed=6, scale=4.0)
    drafter = ModelDrafter(TargetRunner(target.model, None), ModelDrafterConfig(branching=(1,) * 4))
    chunks = list(Engine(target, drafter).generate([1, 2], SamplingParams(max_new_tokens=7)))
    s = chunks[-1].summary
    assert sum(len(c.token_ids) for c in chunks) == 7 == s.tokens
    assert s.finish_reason == "length" and s.rounds == len(chunks)
    assert s.acceptance_length == 1 + sum(c.stats.accepted for c in chunks) / s.rounds
    assert s.acceptance_length > 2  # a perfect draft is accepted
    assert all(c.summary is None for c in chunks[:-1])


def test_sampling_is_deterministic_for_a_seed():
    target = tiny_runner(vocab=16, seed=7)
    draft = TargetRunner(perturbed(target.model, 0.5, seed=8), None)
    drafter = ModelDrafter(draft, ModelDrafterConfig(branching=(2, 2)))
    engine = Engine(target, drafter)
    runs = [
        generate_ids(engine, [3, 4], SamplingParams(temperature=1.0, seed=s, max_new_tokens=20))
        for s in (11, 11, 12)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_strings_on_smollm2(smollm2):
    ids = smollm2.encode("Count from 1 to 20, separated by commas.")
    full = generate_ids(Engine(smollm2), ids, SamplingParams(max_new_tokens=40))
    text = smollm2.tokenizer.decode(full, skip_special_tokens=True)
    assert "5" in text
    chunks = list(
        Engine(smollm2, NgramDrafter()).generate(ids, SamplingParams(max_new_tokens=40, stop="5"))
    )
    streamed = "".join(c.text for c in chunks)
    assert chunks[-1].summary.finish_reason == "stop"
    assert streamed == text[: text.index("5")]
    kept = [t for c in chunks for t in c.token_ids]
    assert kept == full[: len(kept)]


@pytest.mark.parametrize(
    ("drafter", "verifier", "temperature", "message"),
    [
        ("ngram", "traversal", 1.0, "assumes sampled_swor trees"),
        ("ngram", "greedy", 0.5, "only lossless at temperature 0"),
        ("tree-model", "token_level", 1.0, "single chain"),
        ("tree-model", "rrs", 1.0, "assumes sampled_iid"),
    ],
)
def test_engine_refuses_lossy_pairs(drafter, verifier, temperature, message):
    target = tiny_runner()
    d = (
        NgramDrafter()
        if drafter == "ngram"
        else ModelDrafter(tiny_runner(seed=1), ModelDrafterConfig(branching=(2, 1)))
    )
    engine = Engine(target, d, EngineConfig(verifier=verifier))
    with pytest.raises(ValueError, match=message):
        engine.generate([1, 2], SamplingParams(temperature=temperature))


def test_engine_input_errors():
    engine = Engine(tiny_runner())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="context window"):
        engine.generate([1] * 300, SamplingParams())
    with pytest.raises(ValueError, match="must lie in"):
        engine.generate([1, 99], SamplingParams())
    with pytest.raises(ValueError, match="unknown verifier"):
        EngineConfig(verifier="nope")


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "coralline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--temperature", "-1"], "temperature must be"),
        (["generate", "hi", "--top-p", "0"], "top_p must be"),
        (["generate", "hi", "--top-k", "-2"], "top_k must be"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be"),
        (["generate", "hi", "--drafter", "magic"], "unknown drafter 'magic'"),
        (["generate", "hi", "--verifier", "magic"], "unknown verifier 'magic'"),
        (["generate", "hi", "--model", "/nonexistent"], "unknown model '/nonexistent'"),
        (["generate", "   "], "prompt is empty"),
    ],
)
def test_cli_input_errors_are_one_line(args, message):
    res = _cli(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_json_output_on_smollm2():
    res = _cli("generate", "Say hello.", "--max-new-tokens", "12", "--json")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    assert set(obj) == {"text", "token_ids", "stats"}
    assert len(obj["token_ids"]) == obj["stats"]["tokens"] <= 12
    for key in ("rounds", "acceptance_length", "tokens_per_second", "draft_ms", "verify_ms"):
        assert key in obj["stats"]


def _two_turns(target, drafter, params, first, more, eos=None):
    """(turn-2 prompt, output and summary with the retained cache, output of a fresh runner)."""
    engine = Engine(target, drafter)
    out1 = generate_ids(engine, first, params)
    prompt = first + out1 + more
    chunks = list(engine.generate(prompt, params, reuse_cache=True))
    fresh = TargetRunner(target.model, None)
    fresh.eos_token_ids = target.eos_token_ids
    want = generate_ids(Engine(fresh, drafter), prompt, params)
    return first + out1, [t for c in chunks for t in c.token_ids], chunks[-1].summary, want


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("drafted", [False, True])
def test_a_next_turn_reuses_the_cache_and_keeps_the_output(temperature, drafted):
    """Turn 2's prompt extends turn 1's prompt + output: only the new tokens are prefilled and
    the output equals a fresh prefill's (greedy, and sampled with the same seed)."""
    target = tiny_runner(vocab=16, seed=9, scale=3.0)
    draft = TargetRunner(perturbed(target.model, 0.3, seed=10), None)
    drafter = ModelDrafter(draft, ModelDrafterConfig(branching=(2, 2, 1))) if drafted else None
    params = SamplingParams(temperature=temperature, seed=3, max_new_tokens=15)
    history, got, summary, want = _two_turns(target, drafter, params, [1, 5, 9, 2], [7, 3, 4])
    assert got == want and len(got) == 15
    assert summary.cached_prompt_tokens == len(history) - 1
    assert summary.prompt_tokens == len(history) + 3
    # a prompt that shares nothing is prefilled whole, even when reuse is asked for
    s = list(Engine(target).generate([4, 4, 4], params, reuse_cache=True))[-1].summary
    assert s.cached_prompt_tokens == 0


def test_a_turn_that_ended_at_eos_is_reused_but_the_eos():
    target = tiny_runner(vocab=16, seed=5, scale=4.0)
    ids = [2, 4, 6]
    target.eos_token_ids = frozenset({_hf_greedy(target, ids, 12)[4]})
    params = SamplingParams(max_new_tokens=50)
    history, got, summary, want = _two_turns(target, None, params, ids, [1, 8])
    assert history[-1] in target.eos_token_ids and got == want
    assert summary.cached_prompt_tokens == len(history) - 1


def test_a_second_turn_on_smollm2_reuses_the_cache(smollm2):
    """A chat turn built on the ids (conversation.next_turn_ids) after a greedy turn: the same
    output as a fresh prefill, with only the new turn's tokens prefilled."""
    from coralline.conversation import next_turn_ids

    first = smollm2.encode("Name three colours.")
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(smollm2, NgramDrafter())
    out1 = generate_ids(engine, first, params)
    prompt = next_turn_ids(smollm2.tokenizer, first + out1, "And two more?", smollm2.eos_token_ids)
    chunks = list(engine.generate(prompt, params, reuse_cache=True))
    got, summary = [t for c in chunks for t in c.token_ids], chunks[-1].summary
    assert summary.cached_prompt_tokens == len(first) + len(out1) - 1
    assert got == generate_ids(Engine(smollm2.fork(), NgramDrafter()), prompt, params)
