"""The Drafter protocol, the contract between a drafter and its verifier, and the pairing rule.

A drafter lives beside the target (in-process) or in another process (the drafter service):
only token ids, the target features of committed tokens, the accepted node indices and the
proposal cross between them (the proto's Open / Commit / Proposal copy `DraftInput` and
`DraftProposal` field for field).

    reset()                                   forget the sequence
    propose(step: DraftInput, params) -> DraftProposal

The contract, stated once (tests/draft/test_contract.py checks every drafter against it):
  - The committed sequence c_0 .. c_{L-1} is the prompt followed by the generated tokens. Its
    last token c_{L-1} is the ROOT of the next tree: it has not been through the target yet.
  - `new_ids` are the tokens committed since the last call (at the first call everything
    committed so far: the prompt, and with the engine's default fused first round the first
    generated token too); the drafter appends them to its copy of the sequence.
  - `features` [m, d] are the target's features (last hidden state after the final norm) of the
    committed tokens that went through the target since the last call, in sequence order: at
    the first call every committed token but the root (m = len(new_ids) - 1); afterwards the
    previous root and the accepted drafts (m = len(new_ids)). So after every call the drafter
    holds exactly one feature per committed token except the root, and feature j is the
    target's state at c_j (it predicts c_{j+1}). `None` for drafters that need no features.
  - `accepted` tells the drafter what became of its PREVIOUS proposal: the node indices of that
    tree on the accepted path, root first, exactly as the verifier accepted them (the engine may
    still commit fewer tokens when the generation ends inside the round). `None` when there was
    no previous proposal or it was not verified: the verifier replaced it with a plain round
    (a proposal that failed validation, came too late, or did not fit the context window).
    The drafter never infers acceptance by walking its tree with the committed tokens.
  - Randomness: a drafter that samples draws from
    `keyed_generator(params.seed, DRAFT, L)` (sampling.py), L = the committed length with the
    new ids; no generator is passed in. The verifier's coins come from (seed, VERIFY, L). So a
    re-opened or moved session draws the same numbers, and `params.seed` is always set here
    (the engine resolves a missing seed first).

tree_kind says how trees are built, which decides the lossless verifiers:
  "deterministic"  the tree does not depend on the draft's randomness (n-gram, top-k trees):
                   EAGLE's verifier at T > 0, greedy at T = 0
  "sampled_swor"   each node's children are a prefix of a draw without replacement from the draft
                   row sent along: traversal, RRSw (token-level and block on chains), greedy
  "sampled_iid"    children drawn i.i.d.: RRS
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import torch

from coralline.rows import SparseRows
from coralline.sampling import SamplingParams
from coralline.tree import TokenTree
from coralline.verification import VerifierSpec, get_verifier


@dataclass(frozen=True)
class DraftInput:
    """What a drafter is told before each proposal (see the contract above)."""

    new_ids: tuple[int, ...]  # committed since the last call; the last one is the new root
    features: torch.Tensor | None  # [m, d] target features of the tokens that went through it
    accepted: tuple[int, ...] | None = None  # previous proposal's accepted nodes, root first
    # the engine's round this proposal is for (1-based; 0 = not told). Rounds the engine decodes
    # without asking the drafter (its fused first round, load-adaptive plain rounds) leave gaps
    round: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "new_ids", tuple(int(t) for t in self.new_ids))
        if not self.new_ids:
            raise ValueError("a drafter step needs at least one new committed token")
        if self.accepted is not None:
            acc = tuple(int(a) for a in self.accepted)
            if not acc or acc[0] != 0 or any(b <= a for a, b in itertools.pairwise(acc)):
                raise ValueError(f"accepted must list tree nodes from the root (0) down: {acc}")
            object.__setattr__(self, "accepted", acc)
        f = self.features
        if f is not None and (not isinstance(f, torch.Tensor) or f.dim() != 2):
            raise ValueError("features must be a [m, d] tensor or None")


@dataclass(frozen=True)
class DraftProposal:
    tree: TokenTree  # node 0 = root = the last committed token
    rows: SparseRows | None  # [N, V] draft rows the tree was sampled from (None: deterministic)
    fallback: str | None = None  # set by the verifier side when the drafter's proposal was
    # unusable and this root-only proposal replaced it (the reason, for stats and logs)


class Drafter(Protocol):
    name: str
    tree_kind: str  # "deterministic" | "sampled_swor" | "sampled_iid"
    chain_only: bool  # True when every proposal is a single path

    def reset(self) -> None: ...

    def propose(self, step: DraftInput, params: SamplingParams) -> DraftProposal: ...


class FeatureCount:
    """Checks the feature rows of each step against the contract: one feature per committed
    token but the root. Drafters that keep features own one; a mismatch is a ValueError."""

    def __init__(self) -> None:
        self.committed = 0  # L: committed tokens seen (the root included)

    def advance(self, step: DraftInput) -> int:
        """Expected feature rows for this step; raises when `step.features` disagrees."""
        before = self.committed
        self.committed += len(step.new_ids)
        expected = self.committed - 1 - max(before - 1, 0)
        got = None if step.features is None else int(step.features.shape[0])
        if got is not None and got != expected:
            raise ValueError(
                f"expected {expected} feature rows (one per committed token but the root: "
                f"{before} committed before, {len(step.new_ids)} new), got {got}"
            )
        return expected


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
