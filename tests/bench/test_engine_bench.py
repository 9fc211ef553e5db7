"""The engine bench's first-round A/B (`coralline bench engine`, bench/engine.py first_round) on
the real target: both first rounds decode the same tokens, and the report carries the timings
and counts the docs quote."""

from coralline.bench.engine import first_round
from coralline.draft.ngram import NgramDrafter
from coralline.sampling import SamplingParams


def test_the_first_round_ab_reports_identical_answers_and_both_timings(smollm2):
    encoded = [smollm2.encode("Name three colours."), smollm2.encode("Count to five.")]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    report = first_round(smollm2, encoded, params, {"none": None, "ngram": NgramDrafter()})
    assert set(report) == {"none", "ngram"}
    for r in report.values():
        assert r["identical"] is True
        for mode in ("fused", "reference"):
            assert r[mode]["tokens"] == 2 * 2 * 12  # two passes over two prompts
            assert r[mode]["ttft_ms_p50"] > 0 and r[mode]["answer_s"] > 0
    # plain decoding: one token a round either way (the fused round 1 is a round too)
    assert report["none"]["fused"]["rounds"] == report["none"]["reference"]["rounds"] == 48


def test_the_coral_bench_tau_counts_the_rounds_the_drafter_drafted(smollm2):
    """bench/coral.py's tau (the head's quality) leaves out round 1, which the engine decodes
    in the prompt's own forward without asking the drafter; every other round counts."""
    from coralline.bench.coral import measure_t0
    from coralline.draft.registry import make_drafter
    from coralline.engine import Engine

    encoded = [smollm2.encode("Repeat after me: one two three, one two three, one two three.")]
    params = SamplingParams(max_new_tokens=24)
    m = measure_t0(smollm2, make_drafter("coral", smollm2), encoded, params)
    chunks = list(Engine(smollm2, make_drafter("coral", smollm2)).generate(encoded[0], params))
    drafted = [c.stats for c in chunks if c.stats.round > 1]
    assert chunks[0].stats.round == 1 and chunks[0].stats.tree_nodes == 1
    assert m["rounds"] == len(drafted) == len(chunks) - 1
    accepted = sum(s.accepted for s in drafted)
    assert accepted > 0  # the shipped head (with prompt lookup) predicts the repetition
    assert m["tau"] == 1 + accepted / len(drafted)
