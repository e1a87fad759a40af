import pytest
import torch

from decodekit.errors import InvalidParameter
from decodekit.protocol import Tree
from decodekit.runtime.tree import attention_mask, positions

#        0
#      /   \
#     1     2
#    / \     \
#   3   4     5
#   |
#   6
PARENTS = [-1, 0, 0, 1, 1, 2, 3]


def test_depth_and_ancestors_from_parent_pointers():
    tree = Tree.from_parents(PARENTS)
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    expected = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 4}, 5: {0, 2, 5}, 6: {0, 1, 3, 6}}
    for node, ancestors in expected.items():
        assert set(torch.nonzero(tree.ancestors[node]).flatten().tolist()) == ancestors


def test_positions_are_prefix_length_plus_depth():
    tree = Tree.from_parents(PARENTS)
    assert positions([10], tree).tolist() == [[10, 11, 11, 12, 12, 12, 13]]
    assert positions([0, 5], tree)[1].tolist() == [5, 6, 6, 7, 7, 7, 8]


def test_attention_mask_sees_prefix_and_ancestors_only():
    tree = Tree.from_parents(PARENTS)
    mask = attention_mask([4], tree)
    assert mask.shape == (1, 1, 7, 4 + 7)
    assert mask[0, 0, :, :4].all()  # the whole committed prefix
    assert torch.equal(mask[0, 0, :, 4:], tree.ancestors)
    assert not mask[0, 0, 3, 4 + 2]  # node 3 does not see its uncle
    assert not mask[0, 0, 1, 4 + 3]  # nor a parent its child


def test_attention_mask_rows_with_different_prefix_lengths():
    tree = Tree.chain(3)
    mask = attention_mask([2, 5], tree)
    assert mask.shape == (2, 1, 3, 8)
    assert mask[0, 0, :, :2].all() and not mask[0, 0, :, 5:].any()  # row 0 ends at slot 2 + 3
    assert torch.equal(mask[0, 0, :, 2:5], torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.equal(mask[1, 0, :, 5:8], torch.ones(3, 3, dtype=torch.bool).tril())


def test_sliding_window_hides_old_prefix_slots():
    tree = Tree.from_parents([-1, 0, 0])
    mask = attention_mask([10], tree, window=4)
    # node 0 sits at position 10: it sees positions 7..9 of the prefix and itself
    assert mask[0, 0, 0, :10].nonzero().flatten().tolist() == [7, 8, 9]
    # nodes 1, 2 sit at position 11: prefix positions 8..9
    assert mask[0, 0, 1, :10].nonzero().flatten().tolist() == [8, 9]


def test_chain_matches_generic_construction():
    chain = Tree.chain(5)
    generic = Tree.from_parents([-1, 0, 1, 2, 3])
    assert torch.equal(chain.depth, generic.depth) and torch.equal(chain.ancestors, generic.ancestors)


@pytest.mark.parametrize("bad", [[], [0, 0], [-1, 1], [-1, 0, 3, 0], [-1, -1]])
def test_malformed_trees_are_rejected(bad):
    with pytest.raises(InvalidParameter):
        Tree.from_parents(bad)


def test_rows_with_their_own_trees():
    chain, fork = Tree.chain(3), Tree.from_parents([-1, 0, 0])
    assert positions([4, 10], [chain, fork]).tolist() == [[4, 5, 6], [10, 11, 11]]
    mask = attention_mask([4, 10], [chain, fork])
    assert torch.equal(mask[0, 0, :, 4:7], chain.ancestors) and torch.equal(mask[1, 0, :, 10:13], fork.ancestors)
    with pytest.raises(InvalidParameter, match="one size"):
        positions([4, 10], [chain, Tree.chain(2)])


def test_padding_and_prefix_keep_the_original_nodes():
    tree = Tree.from_parents([-1, 0, 1, 0])
    padded = tree.padded(6)
    assert padded.parents.tolist() == [-1, 0, 1, 0, 0, 0]
    assert torch.equal(padded.ancestors[:4, :4], tree.ancestors) and not padded.ancestors[:4, 4:].any()
    assert tree.prefix(3).parents.tolist() == [-1, 0, 1] and tree.prefix(9) is tree and tree.padded(2) is tree
