"""check_proposal: every way a proposal from outside the process can be unusable."""

import pytest
import torch

from coralline.draft.base import DraftProposal
from coralline.draft.check import BadProposal, check_proposal
from coralline.rows import SparseRows
from coralline.tree import TokenTree

V = 10


def _rows(n, ids, vals):
    return SparseRows(
        torch.tensor(ids).expand(n, -1).clone(), torch.tensor(vals).expand(n, -1).clone(), V
    )


def _check(prop, **kw):
    args = dict(
        root=3,
        vocab_size=V,
        max_nodes=8,
        tree_kind="sampled_swor",
        chain_only=False,
        needs_rows=True,
    )
    args.update(kw)
    check_proposal(prop, **args)


GOOD_TREE = TokenTree.from_parents([3, 1, 2, 4], [-1, 0, 0, 1])
GOOD_ROWS = _rows(4, [1, 2, 4], [0.5, 0.3, 0.2])


def test_a_good_proposal_passes():
    _check(DraftProposal(GOOD_TREE, GOOD_ROWS))
    _check(DraftProposal(TokenTree.chain(3, []), None))  # the root alone needs no rows


@pytest.mark.parametrize(
    ("prop", "kw", "match"),
    [
        (DraftProposal(TokenTree.chain(4, [1]), None), {"needs_rows": False}, "root is token 4"),
        (
            DraftProposal(TokenTree.chain(3, list(range(9))), None),
            {"needs_rows": False},
            "over the limit",
        ),
        (DraftProposal(TokenTree.chain(3, [11]), None), {"needs_rows": False}, "vocabulary"),
        (DraftProposal(GOOD_TREE, None), {"chain_only": True}, "chain-only"),
        (
            DraftProposal(
                TokenTree.from_parents([3, 1, 1], [-1, 0, 0]), _rows(3, [1, 2], [0.5, 0.5])
            ),
            {},
            "same token",
        ),
        (DraftProposal(GOOD_TREE, None), {}, "without its draft rows"),
        (DraftProposal(GOOD_TREE, _rows(3, [1, 2, 4], [0.5, 0.3, 0.2])), {}, "shape"),
        (DraftProposal(GOOD_TREE, _rows(4, [1, 2, 4], [0.5, float("nan"), 0.5])), {}, "NaN"),
        (DraftProposal(GOOD_TREE, _rows(4, [1, 2, 4], [1.2, -0.4, 0.2])), {}, "negative"),
        (DraftProposal(GOOD_TREE, _rows(4, [1, 2, 4], [0.2, 0.1, 0.1])), {}, "sums to"),
        (DraftProposal(GOOD_TREE, _rows(4, [1, 1, 4], [0.5, 0.3, 0.2])), {}, "twice"),
        (DraftProposal(GOOD_TREE, _rows(4, [1, 2, 5], [0.5, 0.5, 0.0])), {}, "probability 0"),
    ],
)
def test_bad_proposals_are_refused_with_the_reason(prop, kw, match):
    with pytest.raises(BadProposal, match=match):
        _check(prop, **kw)
