"""Speed benchmarks (`coralline bench ...`): side by side (side_by_side.py, report.py), the
verifiers' cost (verifiers.py), the engine and its cost table (engine.py), the CORAL drafter
(coral.py) and the split pipeline over loopback (pipeline.py, proxy.py). Quality evaluations
(FollowEval-style, IFEval, the lossless evaluation) are a different room: coralline.eval."""
