"""Quality evaluations: the FollowEval-style bilingual harness, IFEval scoring, the lossless
evaluation (speculation beside plain decoding), the demo and the toy exact-acceptance table.
Speed benchmarks live in coralline.bench."""
