"""The toy demo: exact expected acceptance length (tau) of every verifier, side by side.

Each verifier runs under the tree-sampling scheme it is lossless for (SWOR trees for traversal,
RRSw, token-level and block; i.i.d. trees for RRS; deterministic top-k trees for EAGLE's; any
tree at T = 0 for greedy). Every number is exact: all trees and all coins are enumerated
(verification/exact.py), and the last column is the largest total-variation distance between
what the verifiers emit and the target's own law. Knows nothing about real models.
"""

from __future__ import annotations

from coralline.verification import VERIFIERS
from coralline.verification.exact import (
    SHAPES,
    PrefixModel,
    emitted_law,
    extend_law,
    target_law,
    tv_distance,
)

CONTEXT = (0,)
COLUMNS = ["token_level", "block", "rrs", "rrsw", "eagle", "traversal"]


def _cases():
    t = PrefixModel(4, 1, "peaked")
    yield "V=4 peaked, close draft", t, PrefixModel(4, 2, "peaked", base=t, noise=0.7)
    t = PrefixModel(4, 3, "flat")
    yield "V=4 flat, close draft", t, PrefixModel(4, 4, "flat", base=t, noise=0.7)
    t = PrefixModel(3, 5, "flat", holes=1)
    yield "V=3 holes, unrelated", t, PrefixModel(3, 6, "flat")


def _row(target, draft, shape, names):
    length = shape.depth + 1
    exact = target_law(target, CONTEXT, length)
    taus, worst = {}, 0.0
    for name in names:
        spec = VERIFIERS[name]
        if spec.chain_only and shape.name not in ("chain3", "single"):
            continue
        scheme = "sampled_swor" if spec.tree_kind == "any" else spec.tree_kind
        law = emitted_law(spec.fn, scheme, shape, target, draft, CONTEXT)
        taus[name] = sum(len(s) * p for s, p in law.items())
        worst = max(worst, tv_distance(extend_law(law, target, CONTEXT, length), exact))
    return taus, worst


def run(print_fn=print) -> list[dict]:
    """Print the tables; return their rows (for tests and JSON)."""
    rows = []
    shapes = [SHAPES["chain3"], SHAPES["star3"], SHAPES["unbalanced"]]
    print_fn("Exact expected tokens per round (tau) at T = 1, every tree and coin enumerated")
    head = f"{'models':<26}{'tree':<12}" + "".join(f"{c:>12}" for c in COLUMNS) + f"{'max TV':>10}"
    print_fn(head)
    print_fn("-" * len(head))
    for label, target, draft in _cases():
        for shape in shapes:
            taus, worst = _row(target, draft, shape, COLUMNS)
            cells = "".join(f"{taus[c]:>12.4f}" if c in taus else f"{'-':>12}" for c in COLUMNS)
            print_fn(f"{label:<26}{shape.name:<12}{cells}{worst:>10.1e}")
            rows.append({"models": label, "tree": shape.name, "tau": taus, "max_tv": worst})
    print_fn("")
    print_fn("At T = 0 (one-hot target rows) greedy and traversal coincide:")
    target = PrefixModel(4, 7, "onehot")
    draft = PrefixModel(4, 8, "flat", base=PrefixModel(4, 7, "peaked"), noise=1.0)
    for shape in shapes:
        taus, worst = _row(target, draft, shape, ["greedy", "traversal"])
        print_fn(
            f"{'V=4 T=0':<26}{shape.name:<12}{'greedy':>12}{taus['greedy']:>8.4f}"
            f"{'traversal':>12}{taus['traversal']:>8.4f}{worst:>10.1e}"
        )
        rows.append({"models": "V=4 T=0", "tree": shape.name, "tau": taus, "max_tv": worst})
    print_fn("")
    print_fn(
        "tau = accepted drafts + bonus per target forward. Chains: block = traversal >= "
        "token-level. Trees: traversal >= RRSw."
    )
    return rows
