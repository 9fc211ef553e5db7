"""Verifiers: one module each, one signature, and the registry that names them.

    verify(tree, target_probs [N, V], draft_probs [N, V] | SparseRows | None, rng,
           *, check=True) -> VerifyResult

Row i of each matrix is the distribution of the token after node i's path, AFTER the same
warping (temperature, top-k, top-p) that sampling uses. Each verifier is lossless under the
tree-sampling scheme named by its `VerifierSpec.tree_kind`; the engine refuses mismatched pairs.
"""

from __future__ import annotations

from coralline.verification.block import verify_block
from coralline.verification.common import VerifierSpec, VerifyResult
from coralline.verification.eagle import verify_eagle
from coralline.verification.greedy import verify_greedy
from coralline.verification.rrs import verify_rrs, verify_rrsw
from coralline.verification.token_level import verify_token_level
from coralline.verification.traversal import verify_traversal

VERIFIERS: dict[str, VerifierSpec] = {
    "greedy": VerifierSpec(
        verify_greedy,
        "any",
        needs_draft=False,
        doc="temperature 0: accept the longest path of target argmax tokens",
    ),
    "token_level": VerifierSpec(
        verify_token_level,
        "sampled_swor",
        needs_draft=True,
        chain_only=True,
        doc="Leviathan/Chen speculative sampling on a chain",
    ),
    "rrs": VerifierSpec(
        verify_rrs,
        "sampled_iid",
        needs_draft=True,
        doc="SpecInfer recursive rejection sampling, children drawn i.i.d.",
    ),
    "rrsw": VerifierSpec(
        verify_rrsw,
        "sampled_swor",
        needs_draft=True,
        doc="recursive rejection sampling, children drawn without replacement",
    ),
    "eagle": VerifierSpec(
        verify_eagle,
        "deterministic",
        needs_draft=False,
        doc="EAGLE's verifier for deterministic (top-k) trees",
    ),
    "block": VerifierSpec(
        verify_block,
        "sampled_swor",
        needs_draft=True,
        chain_only=True,
        doc="block verification: optimal for a single draft chain",
    ),
    "traversal": VerifierSpec(
        verify_traversal,
        "sampled_swor",
        needs_draft=True,
        doc="Traversal Verification: leaf-to-root, sequence-level, any tree",
    ),
}


def get_verifier(name: str) -> VerifierSpec:
    """The registry entry for `name`, or a ValueError listing the known names."""
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(
            f"unknown verifier {name!r}; choose one of: {', '.join(sorted(VERIFIERS))}"
        ) from None


__all__ = ["VERIFIERS", "VerifierSpec", "VerifyResult", "get_verifier"]
