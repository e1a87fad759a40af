import pytest
import torch

from decodekit.drafters import TargetInfo, make_drafter, parse_method
from decodekit.drafters.recycling import PUBLISHED_TREE, TemplateTree, TokenRecycling, path_score, subtree
from decodekit.errors import InvalidParameter
from decodekit.protocol import StepOutcome, Tree

VOCAB = 50


def test_published_template_shape():
    template = TemplateTree(PUBLISHED_TREE)
    depth = template.tree.depth
    assert template.tree.size == 81  # root + 80 nodes
    assert [int((depth == d).sum()) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    leaves = set(range(81)) - set(template.tree.parents.tolist())
    assert len(leaves) == 40


@pytest.mark.parametrize("size", [1, 5, 16, 24, 80])
def test_subtrees_are_closed_under_parents(size):
    nodes = subtree(size)
    assert len(nodes) == size
    assert all(len(p) == 1 or p[:-1] in nodes for p in nodes)
    TemplateTree(nodes)  # compiles


@pytest.mark.parametrize("size", [2, 3, 8, 24])
def test_subtree_keeps_the_most_probable_nodes(size):
    chosen = subtree(size)
    left_out = [p for p in PUBLISHED_TREE if p not in chosen]
    assert min(map(path_score, chosen)) >= max(map(path_score, left_out))
    assert chosen[:2] == ("0", "1") or chosen[:2] == ("0", "00")  # the top-ranked guess always comes first
    # most probable first: a draft cut to its first n nodes is the best subtree of n nodes
    assert all(chosen[:n] == subtree(n) for n in range(1, size))
    assert [path_score(p) for p in chosen] == sorted(map(path_score, chosen), reverse=True)


def test_propose_walks_the_adjacency_matrix_breadth_first():
    drafter = TokenRecycling(TargetInfo(VOCAB), k=2, tree="3", seed_prompt=False)
    # hand-fill: after 7 comes [8, 9]; after 8 comes [10, 11]
    drafter.adjacency[7] = torch.tensor([8, 9])
    drafter.adjacency[8] = torch.tensor([10, 11])
    drafter.adjacency[10] = torch.tensor([12, 13])
    draft = drafter.propose(torch.tensor([1, 2, 7]))
    paths = ["", *subtree(3)]
    expected = {"": 7, "0": 8, "1": 9, "00": 10, "01": 11, "000": 12}
    assert draft.tokens.tolist() == [expected[p] for p in paths]
    assert draft.tokens[0] == 7


def test_observe_overwrites_every_nodes_row_with_topk():
    drafter = TokenRecycling(TargetInfo(VOCAB), k=3, tree="2")
    draft = drafter.propose(torch.tensor([4]))
    logits = torch.zeros(draft.tokens.numel(), VOCAB)
    for i in range(draft.tokens.numel()):
        logits[i, [20 + i, 30 + i, 40 + i]] = torch.tensor([3.0, 2.0, 1.0])
    draft_tokens = torch.tensor([4, 5, 6])
    outcome = StepOutcome(type(draft)(draft_tokens, draft.tree), logits, torch.tensor([0]), [20])
    drafter.observe(outcome)
    assert drafter.adjacency[4].tolist() == [20, 30, 40]
    assert drafter.adjacency[5].tolist() == [21, 31, 41]  # a rejected node's row is recycled too
    assert drafter.adjacency[6].tolist() == [22, 32, 42]
    assert drafter.adjacency.dtype == torch.int32
    undrafted = StepOutcome(
        type(draft)(draft_tokens[:1], Tree.chain(1)), logits[:1] * 0, torch.tensor([0]), [0], None, False
    )
    drafter.observe(undrafted)  # a step the engine did not draft (under load) leaves the matrix alone
    assert drafter.adjacency[4].tolist() == [20, 30, 40]


def test_prompt_seeding_fills_rows_from_prompt_logits():
    drafter = TokenRecycling(TargetInfo(VOCAB), k=2, tree="3", seed_prompt=True)
    assert drafter.wants_prompt_logits
    prompt = torch.tensor([3, 4, 5])
    logits = torch.zeros(2, VOCAB)
    logits[0, 9], logits[0, 8], logits[1, 7], logits[1, 6] = 4, 3, 4, 3
    drafter.begin(prompt, logits)
    assert drafter.adjacency[3].tolist() == [9, 8] and drafter.adjacency[4].tolist() == [7, 6]
    assert drafter.adjacency[5].tolist() == [0, 0]


def test_matrix_size_in_bytes():
    drafter = TokenRecycling(TargetInfo(49152), k=8)
    assert drafter.memory_bytes() == 49152 * 8 * 4


def test_method_specs():
    cls, kwargs = parse_method("recycling:k=4,tree=16,seed_prompt=true")
    assert cls is TokenRecycling and kwargs == {"k": 4, "tree": "16", "seed_prompt": True}
    drafter = make_drafter("recycling:tree=published", TargetInfo(VOCAB))
    assert drafter.template.tree.size == 81


@pytest.mark.parametrize(
    "spec",
    [
        "nope",
        "recycling:k=x",
        "recycling:depth=3",
        "recycling:tree=huge",
        "recycling:tree=0",
        "recycling:k=2,tree=published",
        "recycling:k",
        "ar:k=2",
        "recycling:k=0",
    ],
)
def test_bad_specs_raise_invalid_parameter(spec):
    with pytest.raises(InvalidParameter):
        make_drafter(spec, TargetInfo(VOCAB))
