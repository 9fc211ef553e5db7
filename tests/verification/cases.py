"""Model pairs and shapes shared by the exact and Monte Carlo verification tests."""

from coralline.verification import VERIFIERS
from coralline.verification.exact import SHAPES, PrefixModel

CONTEXT = (0,)


def model_pairs():
    """(id, target, draft): flat/peaked, V in {3, 4}, supports with holes, top-p warping."""
    pairs = []
    t = PrefixModel(3, 11, "flat")
    pairs.append(("V3-flat-unrelated", t, PrefixModel(3, 12, "flat")))
    t = PrefixModel(3, 13, "peaked")
    pairs.append(("V3-peaked-related", t, PrefixModel(3, 14, "peaked", base=t, noise=1.0)))
    t = PrefixModel(4, 15, "flat", holes=1)
    pairs.append(("V4-flat-holes-both", t, PrefixModel(4, 16, "flat", holes=1)))
    t = PrefixModel(4, 17, "peaked")
    pairs.append(("V4-peaked-related", t, PrefixModel(4, 18, "peaked", base=t, noise=0.7)))
    t = PrefixModel(4, 19, "peaked", holes=2)
    pairs.append(("V4-target-holes", t, PrefixModel(4, 20, "flat", holes=1, base=t, noise=2.0)))
    t = PrefixModel(4, 21, "flat", temperature=0.7, top_p=0.8)
    d = PrefixModel(4, 22, "flat", temperature=0.7, top_p=0.8, base=t, noise=1.0)
    pairs.append(("V4-T0.7-topp0.8", t, d))
    return pairs


def shapes_for(name: str):
    spec = VERIFIERS[name]
    if spec.chain_only:
        return [SHAPES["single"], SHAPES["chain3"]]
    return list(SHAPES.values())


LOSSLESS_SAMPLING = [n for n, s in VERIFIERS.items() if s.lossless and n != "greedy"]
