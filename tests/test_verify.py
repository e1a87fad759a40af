import torch

from decodekit.protocol import Tree, greedy_choice
from decodekit.verify import continuation_matches, verify_greedy

PARENTS = [-1, 0, 0, 1, 1, 2, 3]  # see test_tree.py


def test_longest_accepted_path_and_bonus():
    tree = Tree.from_parents(PARENTS)
    tokens = torch.tensor([5, 7, 8, 9, 4, 1, 2])
    # argmax after each node: root -> 7 (node 1 ok, node 2 wrong), node 1 -> 4 (node 4 ok, node 3 wrong)
    target = torch.tensor([7, 4, 0, 0, 6, 0, 0])
    path, bonus = verify_greedy(tokens, tree, target)
    assert path.tolist() == [0, 1, 4]
    assert bonus == 6  # the target's token after node 4


def test_child_of_rejected_node_is_never_accepted():
    tree = Tree.from_parents(PARENTS)
    tokens = torch.tensor([5, 7, 8, 9, 4, 1, 2])
    target = torch.tensor([3, 9, 0, 2, 0, 0, 0])  # node 3 and 6 match their parents but node 1 does not
    path, bonus = verify_greedy(tokens, tree, target)
    assert path.tolist() == [0]
    assert bonus == 3


def test_full_chain_accepted():
    tree = Tree.chain(4)
    tokens = torch.tensor([1, 2, 3, 4])
    path, bonus = verify_greedy(tokens, tree, torch.tensor([2, 3, 4, 5]))
    assert path.tolist() == [0, 1, 2, 3] and bonus == 5


def test_tie_between_equal_depths_takes_lowest_index():
    tree = Tree.from_parents([-1, 0, 0])
    tokens = torch.tensor([1, 2, 2])  # duplicate siblings, both correct
    path, bonus = verify_greedy(tokens, tree, torch.tensor([2, 8, 9]))
    assert path.tolist() == [0, 1] and bonus == 8


def test_root_only_tree_is_plain_greedy():
    path, bonus = verify_greedy(torch.tensor([3]), Tree.chain(1), torch.tensor([11]))
    assert path.tolist() == [0] and bonus == 11


def test_side_tokens_and_their_descendants_are_never_accepted():
    tree = Tree.from_parents(PARENTS)
    tokens = torch.tensor([5, 7, 8, 9, 4, 1, 2])
    target = torch.tensor([7, 4, 0, 0, 6, 0, 0])  # as in the first test: path 0 -> 1 -> 4 would win
    side = torch.tensor([True, True, True, True, False, True, True])  # node 4 rides along only
    path, bonus = verify_greedy(tokens, tree, target, side)
    assert path.tolist() == [0, 1]
    assert bonus == 4
    assert verify_greedy(tokens, tree, target, torch.tensor([True] + [False] * 6))[0].tolist() == [0]


def test_continuation_matches_scores_a_tree_against_the_text_that_followed():
    #   0 -> 1 (5) -> 3 (6) -> 5 (7)
    #     -> 2 (8) -> 4 (6)
    tree = Tree.from_parents([-1, 0, 0, 1, 2, 3])
    tokens = torch.tensor([9, 5, 8, 6, 6, 7])
    reached, matched = continuation_matches(tokens.tolist(), tree.parents.tolist(), [5, 6])
    assert matched == [True, True, False, True, False, False]
    assert reached == [True, True, True, True, False, False]  # node 5 lies deeper than the text
    _, matched = continuation_matches(tokens.tolist(), tree.parents.tolist(), [5, 6, 7])
    # greedy verification accepts exactly the matched path when the target's argmaxes are the continuation
    target = torch.tensor([5, 6, 0, 7, 0, 1])
    path, _ = verify_greedy(tokens, tree, target)
    assert [i for i, m in enumerate(matched) if m] == path.tolist() == [0, 1, 3, 5]


def test_greedy_choice_is_argmax_ties_and_nan_included():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("nan"), 5.0, 5.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert greedy_choice(logits).tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 0]
    tied = torch.randint(-2, 2, (16, 49152), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(greedy_choice(tied), tied.argmax(dim=-1))
