"""TokenTree: validation errors, derived views by hand on 3-5 node trees."""

import pytest
import torch

from coralline.tree import TokenTree

NEG = torch.finfo(torch.float32).min


def test_views_by_hand_on_a_five_node_tree():
    #      0(10)
    #     /     \
    #   1(11)   2(12)
    #    |        \
    #   3(13)     4(14)
    t = TokenTree.from_parents([10, 11, 12, 13, 14], [-1, 0, 0, 1, 2])
    assert t.depth.tolist() == [0, 1, 1, 2, 2]
    assert t.children == ((1, 2), (3,), (4,), (), ())
    assert t.leaves == (3, 4)
    assert t.path(3) == (0, 1, 3)
    assert t.path_tokens(4) == (10, 12, 14)
    assert not t.is_chain
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(t.ancestor_mask, expected)
    mask = t.attention_mask(prefix_len=2)
    assert mask.shape == (5, 7)
    assert mask.dtype == torch.float32
    assert torch.equal(mask[:, :2], torch.zeros(5, 2))
    assert torch.equal(mask[:, 2:] == 0, expected)
    assert torch.equal(mask[:, 2:][~expected], torch.full((int((~expected).sum()),), NEG))
    assert t.position_ids(2).tolist() == [2, 3, 3, 4, 4]
    assert t.position_ids(0).tolist() == [0, 1, 1, 2, 2]


def test_three_node_chain_and_mask_dtype():
    t = TokenTree.chain(5, [6, 7])
    assert t.tokens.tolist() == [5, 6, 7]
    assert t.parents.tolist() == [-1, 0, 1]
    assert t.is_chain
    assert t.leaves == (2,)
    m = t.attention_mask(prefix_len=1, dtype=torch.float64)
    assert m.dtype == torch.float64
    assert m.tolist()[0] == [0, 0, torch.finfo(torch.float64).min, torch.finfo(torch.float64).min]
    assert m.tolist()[2] == [0, 0, 0, 0]


def test_from_paths_merges_shared_prefixes_in_order():
    t = TokenTree.from_paths(1, [[2, 3], [2, 4], [5]])
    assert t.tokens.tolist() == [1, 2, 3, 4, 5]
    assert t.parents.tolist() == [-1, 0, 1, 1, 0]
    assert t.children[1] == (2, 3)
    single = TokenTree.from_paths(9, [])
    assert single.num_nodes == 1 and single.leaves == (0,)


@pytest.mark.parametrize(
    ("tokens", "parents", "vocab", "message"),
    [
        ([], [], None, "empty"),
        ([1, 2], [-1], None, "same length"),
        ([1, 2], [0, 0], None, "parents\\[0\\] must be -1"),
        ([1, 2, 3], [-1, 0, 2], None, "out of order"),
        ([1, 2, 3], [-1, 0, 5], None, "out of order"),
        ([1, 2, 3], [-1, -1, 0], None, "out of order"),
        ([1, -2], [-1, 0], None, "negative"),
        ([1, 7], [-1, 0], 5, "outside the vocabulary"),
        ([[1, 2]], [[-1, 0]], None, "1-D"),
        ([1], [-1], 0, "vocab_size must be positive"),
    ],
)
def test_validation_errors(tokens, parents, vocab, message):
    with pytest.raises(ValueError, match=message):
        TokenTree(torch.tensor(tokens, dtype=torch.int64), torch.tensor(parents), vocab)


def test_float_tokens_and_bad_path_node_are_errors():
    with pytest.raises(ValueError, match="integer"):
        TokenTree(torch.tensor([1.0, 2.0]), torch.tensor([-1, 0]))
    t = TokenTree.chain(0, [1])
    with pytest.raises(ValueError, match="outside the tree"):
        t.path(2)
    with pytest.raises(ValueError, match="prefix_len"):
        t.attention_mask(-1)


def test_child_and_walk_follow_tokens_from_the_root():
    # root 9 -> 1 -> 2, root -> 5 -> 2, root -> 1 (a second 1: the first in node order wins)
    tree = TokenTree.from_parents([9, 1, 5, 2, 2, 1], [-1, 0, 0, 1, 2, 0])
    assert tree.child(0, 1) == 1 and tree.child(0, 5) == 2 and tree.child(0, 7) is None
    assert tree.child(2, 2) == 4
    assert tree.walk([1, 2, 3]) == (1, 3)  # stops where the tokens leave the tree
    assert tree.walk([5, 2]) == (2, 4)
    assert tree.walk([]) == () and tree.walk([7, 1]) == ()


def test_root_only_is_the_one_node_chain_and_is_shared():
    t = TokenTree.root_only(7)
    ref = TokenTree.chain(7, [])
    assert t.num_nodes == 1 and t.token_list == ref.token_list == (7,)
    assert torch.equal(t.parents, ref.parents) and torch.equal(t.ancestor_mask, ref.ancestor_mask)
    assert torch.equal(t.position_ids(5), ref.position_ids(5))
    assert TokenTree.root_only(7) is t and TokenTree.root_only(8) is not t  # one per token
    with pytest.raises(ValueError, match="negative"):
        TokenTree.root_only(-1)
