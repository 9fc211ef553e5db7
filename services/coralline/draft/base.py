"""The Drafter protocol, and the rule that pairs drafters with verifiers.

A drafter lives beside the target (in-process) or in another process (the drafter service):
only token ids, the target features of committed tokens, and the proposal cross between them.

    reset()                                  forget the sequence
    propose(new_ids, new_features, params, generator) -> DraftProposal
        new_ids       tokens committed since the last call (the whole prompt on the first call);
                      the last one is the root of the tree to propose
        new_features  [len(new_ids) - 1, d] target features of new_ids[:-1] (the root has not
                      been through the target yet), or None for drafters that ignore them
        params        the request's SamplingParams (drafts are warped like the target)
        generator     the draft-side torch.Generator (never the verifier's)

tree_kind says how trees are built, which decides the lossless verifiers:
  "deterministic"  the tree does not depend on the draft's randomness (n-gram, top-k trees):
                   EAGLE's verifier at T > 0, greedy at T = 0
  "sampled_swor"   each node's children are a prefix of a draw without replacement from the draft
                   row sent along: traversal, RRSw (token-level and block on chains), greedy
  "sampled_iid"    children drawn i.i.d.: RRS
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from coralline.rows import SparseRows
from coralline.sampling import SamplingParams
from coralline.tree import TokenTree
from coralline.verification import VerifierSpec, get_verifier


@dataclass(frozen=True)
class DraftProposal:
    tree: TokenTree  # node 0 = root = the last committed token
    rows: SparseRows | None  # [N, V] draft rows the tree was sampled from (None: deterministic)


class Drafter(Protocol):
    name: str
    tree_kind: str  # "deterministic" | "sampled_swor" | "sampled_iid"
    chain_only: bool  # True when every proposal is a single path

    def reset(self) -> None: ...

    def propose(
        self,
        new_ids: list[int],
        new_features: torch.Tensor | None,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> DraftProposal: ...


def default_verifier(drafter: Drafter | None, params: SamplingParams) -> str:
    """Greedy at T = 0; else traversal for SWOR trees, RRS for i.i.d., EAGLE's otherwise
    (also for plain decoding: on a root-only tree it samples the target's row)."""
    if params.greedy:
        return "greedy"
    if drafter is None:
        return "eagle"
    return {"sampled_swor": "traversal", "sampled_iid": "rrs"}.get(drafter.tree_kind, "eagle")


def check_pair(drafter: Drafter | None, verifier: str, params: SamplingParams) -> VerifierSpec:
    """The verifier's spec, or a ValueError when the pair would not be lossless.

    At temperature 0 every lossless verifier reduces to greedy, which the engine then uses."""
    spec = get_verifier(verifier)
    if params.greedy:
        return get_verifier("greedy")
    if spec.tree_kind == "any":
        raise ValueError(
            f"the {verifier!r} verifier is only lossless at temperature 0 (got "
            f"{params.temperature}); use {default_verifier(drafter, params)!r}"
        )
    if drafter is None or spec.tree_kind == "deterministic":
        return spec  # EAGLE's verifier is lossless for any tree fixed before verification
    if drafter.tree_kind != spec.tree_kind:
        raise ValueError(
            f"the {verifier!r} verifier assumes {spec.tree_kind} trees but the {drafter.name!r} "
            f"drafter builds {drafter.tree_kind} trees: use "
            f"{default_verifier(drafter, params)!r}"
        )
    if spec.chain_only and not drafter.chain_only:
        raise ValueError(
            f"the {verifier!r} verifier checks a single chain but the {drafter.name!r} drafter "
            "proposes trees: use 'traversal' or 'rrsw'"
        )
    return spec
