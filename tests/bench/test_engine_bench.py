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
