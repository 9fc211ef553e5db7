"""Evaluation and benchmarks: toy exact-acceptance tables, verifier micro-benchmarks; later the
FollowEval-style harness, IFEval and end-to-end benchmarks."""
