"""Every verifier rejects bad input with a clear ValueError, and the registry names them."""

import pytest
import torch

from coralline.rows import SparseRows
from coralline.sampling import make_generator
from coralline.tree import TokenTree
from coralline.verification import VERIFIERS, get_verifier

V = 5
TREE = TokenTree.from_parents([0, 1, 2], [-1, 0, 0])  # root with two children
CHAIN = TokenTree.chain(0, [1, 2])


def _rows(n=3, v=V):
    return torch.full((n, v), 1.0 / v)


def _call(name, tree, target, draft):
    spec = VERIFIERS[name]
    return spec.fn(tree, target, draft, make_generator(0))


@pytest.mark.parametrize("name", list(VERIFIERS))
def test_valid_input_runs(name):
    tree = CHAIN if VERIFIERS[name].chain_only else TREE
    res = _call(name, tree, _rows(), _rows())
    assert res.accepted[0] == 0
    assert 0 <= res.bonus_token < V
    assert list(res.accepted) == list(tree.path(res.accepted[-1]))


BAD_TARGETS = [
    (_rows(2), "rows but the tree has 3 nodes"),
    (_rows()[0], "2-D"),
    (torch.ones(3, V, dtype=torch.int64), "floating point"),
    (torch.tensor([[float("nan")] * V] * 3), "NaN or infinite"),
    (torch.tensor([[1.5, -0.5, 0, 0, 0]] * 3), "negative"),
    (torch.full((3, V), 0.3), "sums to 1.5"),
    ([[0.2] * V] * 3, "torch.Tensor"),
]


@pytest.mark.parametrize("name", list(VERIFIERS))
@pytest.mark.parametrize(("target", "message"), BAD_TARGETS)
def test_bad_target_rows(name, target, message):
    tree = CHAIN if VERIFIERS[name].chain_only else TREE
    with pytest.raises(ValueError, match=message):
        _call(name, tree, target, _rows())


DRAFTING = [n for n, s in VERIFIERS.items() if s.needs_draft]


@pytest.mark.parametrize("name", DRAFTING)
def test_bad_draft_rows(name):
    tree = CHAIN if VERIFIERS[name].chain_only else TREE
    with pytest.raises(ValueError, match="needs draft_probs"):
        _call(name, tree, _rows(), None)
    with pytest.raises(ValueError, match="expected"):
        _call(name, tree, _rows(), _rows(3, V + 1))
    with pytest.raises(ValueError, match="sums to"):
        _call(name, tree, _rows(), torch.full((3, V), 0.5))
    zero_at_child = _rows()
    zero_at_child[0] = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])  # token 1 cannot be drafted
    with pytest.raises(ValueError, match="draft probability 0"):
        _call(name, tree, _rows(), zero_at_child)
    sparse = SparseRows(torch.tensor([[1, 1], [0, 1], [0, 1]]), torch.full((3, 2), 0.5), V)
    with pytest.raises(ValueError, match="same token twice"):
        _call(name, tree, _rows(), sparse)
    wrong_vocab = SparseRows(torch.tensor([[1, 2]] * 3), torch.full((3, 2), 0.5), V + 2)
    with pytest.raises(ValueError, match="shape"):
        _call(name, tree, _rows(), wrong_vocab)


@pytest.mark.parametrize("name", ["token_level", "block"])
def test_chain_only_verifiers_refuse_trees(name):
    with pytest.raises(ValueError, match="single chain"):
        _call(name, TREE, _rows(), _rows())


@pytest.mark.parametrize("name", ["rrsw", "traversal"])
def test_swor_verifiers_refuse_duplicate_siblings(name):
    tree = TokenTree.from_parents([0, 1, 1], [-1, 0, 0])
    with pytest.raises(ValueError, match="same token"):
        _call(name, tree, _rows(), _rows())


def test_rrs_accepts_duplicate_siblings_from_iid_drafts():
    tree = TokenTree.from_parents([0, 1, 1], [-1, 0, 0])
    assert _call("rrs", tree, _rows(), _rows()).accepted[0] == 0


@pytest.mark.parametrize("name", list(VERIFIERS))
def test_token_outside_vocabulary(name):
    tree = TokenTree.chain(0, [1, V + 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _call(name, tree, _rows(), _rows())


def test_single_node_tree_samples_the_bonus_from_the_root_row():
    root_only = TokenTree.from_parents([3], [-1])
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    for name, spec in VERIFIERS.items():
        res = spec.fn(root_only, target, target, make_generator(1))
        assert res.accepted == (0,) and res.bonus_token == 2, name


def test_registry_lookup():
    assert get_verifier("traversal").tree_kind == "sampled_swor"
    with pytest.raises(ValueError, match=r"unknown verifier 'nope'.*traversal"):
        get_verifier("nope")


def test_sparse_rows_validation():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        SparseRows(torch.tensor([1, 2]), torch.tensor([0.5, 0.5]), V)
    with pytest.raises(ValueError, match="lie in"):
        SparseRows(torch.tensor([[1, 9]]), torch.tensor([[0.5, 0.5]]), V)
    dense = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(SparseRows.from_dense(dense).to_dense(), dense)
