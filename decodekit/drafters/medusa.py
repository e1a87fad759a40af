"""Medusa (Cai et al., 2024; Medusa-1: heads trained on a frozen target): ``K`` small heads read the target's
last hidden state and each guesses one token further ahead; a static tree of the heads' top candidates is
verified in the next step.

The hidden state is the residual stream leaving the target's last block at the last accepted node of the step
just verified (``StepOutcome.hidden``): there the target's own head chose the token that is now the root, and
head ``k`` guesses the token ``k`` places after the root. A head is one residual block on the unit-RMS hidden
state, ``z + SiLU(W_k z + b_k)`` with ``z = h / rms(h)``, turned into logits by the target's final norm and LM
head (shared, not copied: :meth:`ModelAccess.head`); zero weights make a head repeat the target's guess for the
root, which is where training starts. Candidates come from the vocabulary the heads were trained over (``vocab``
in the file: the tokens the target wrote in its training answers). The tree is Medusa's: the ``max_nodes`` paths of
head ranks with the highest chance of being accepted, that chance the product of each head's measured accept
rate at each rank (measured on held-out answers when training, kept in the file).

Drafts are deterministic (the heads' top candidates), so verification accepts a node with the target's
probability of its token: greedy output equals ``ar`` and sampled output follows the target exactly.

Heads are trained by ``decodekit train medusa`` (decodekit/train/medusa.py) and found, in order: the ``heads``
option, the file ``train`` writes by default for the target, the package's shipped file for the target.
The first step of a request drafts nothing (no hidden state yet), nor, inside a hybrid, a step after one whose
accepted path ran past this drafter's nodes (the last node's hidden state is then another part's). Memory: the
heads (``K * hidden**2`` floats).
"""

from __future__ import annotations

import heapq
import json
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from decodekit.drafters.options import FilePath, Range, checked_options
from decodekit.errors import InvalidParameter, ModelFileError, clip
from decodekit.protocol import Draft, Drafter, ModelAccess, StepOutcome, TargetInfo, Tree

KIND = "medusa"
FORMAT = 1
MAX_HEADS_BYTES = 1 << 30


class Heads(torch.nn.Module):
    """``K`` residual heads over ``hidden``-wide states: ``z [..., H]`` (unit RMS) -> ``[..., K, H]``."""

    def __init__(self, count: int, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(count, hidden, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(count, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.unsqueeze(-2) + F.silu(torch.einsum("...h,kgh->...kg", z, self.weight) + self.bias)


def unit_rms(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [..., H]`` scaled to a root mean square of 1 (float32)."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def save_heads(path: Path, heads: Heads, vocab: torch.Tensor, accept: torch.Tensor, meta: dict) -> None:
    """Write a heads file: the heads (bfloat16), ``vocab`` int64 ``[S]``, ``accept`` float ``[K, R]`` (head k's
    rank-r candidate is the right token this often), and ``meta`` (``identity``, ``vocab_size``, ...)."""
    from safetensors.torch import save_file

    tensors = {
        "weight": heads.weight.detach().to(torch.bfloat16).contiguous(),
        "bias": heads.bias.detach().to(torch.bfloat16).contiguous(),
        "vocab": vocab.to(torch.int64).contiguous(),
        "accept": accept.float().contiguous(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, partial, metadata={"kind": KIND, "format": str(FORMAT), "meta": json.dumps(meta)})
    partial.replace(path)


def load_heads(path: Path, target: ModelAccess) -> tuple[Heads, torch.Tensor, torch.Tensor]:
    """The heads, vocabulary and accept rates of a heads file trained for ``target``; ModelFileError when the file
    cannot be read or was trained for other weights."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as err:  # safetensors raises assorted errors on damaged files
        raise ModelFileError(f"cannot read medusa heads {path}: {err}") from None
    if header.get("kind") != KIND or header.get("format") != str(FORMAT):
        raise ModelFileError(f"{path} is not a medusa heads file of format {FORMAT}")
    meta = json.loads(header.get("meta", "{}"))
    if meta.get("identity") != target.identity:
        raise InvalidParameter(
            f"the medusa heads {path} were trained for other weights ({meta.get('model', '?')}); train heads for "
            f"this model: decodekit train medusa --model ..."
        )
    count, hidden, _ = tensors["weight"].shape
    heads = Heads(count, hidden)
    heads.load_state_dict({"weight": tensors["weight"].float(), "bias": tensors["bias"].float()})
    return heads.eval().requires_grad_(False), tensors["vocab"], tensors["accept"]


def shipped_file(identity: str) -> Path | None:
    """The heads file shipped in the package for the weights ``identity`` names, if any."""
    for entry in files("decodekit").joinpath("data").iterdir():
        if entry.name.startswith(f"{KIND}-") and entry.name.endswith(f"-{identity}.safetensors"):
            return Path(str(entry))
    return None


def best_paths(accept: torch.Tensor, max_nodes: int) -> list[tuple[int, ...]]:
    """Medusa's tree: the ``max_nodes`` rank paths ``(r_1, ..., r_d)`` (head d's rank-r_d candidate at depth d)
    with the highest chance ``prod accept[k - 1, r_k]``, best first; a path's prefixes are among them and come
    before it. ``accept`` float ``[K, R]``, each row non-increasing in r or not."""
    rates = accept.tolist()
    frontier = [(-rates[0][r], (r,)) for r in range(len(rates[0]))]
    heapq.heapify(frontier)
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < max_nodes:
        negative, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < len(rates):
            for r in range(len(rates[len(path)])):
                heapq.heappush(frontier, (negative * rates[len(path)][r], (*path, r)))
    return chosen


@checked_options
class Medusa(Drafter):
    """Method ``medusa``: the trained heads in ``heads`` (default: those trained or shipped for the target) draft
    a tree of ``max_nodes`` nodes (root excluded) from their top candidates."""

    wants_step_logits = False

    def __init__(
        self,
        target: TargetInfo,
        heads: Annotated[str, FilePath(MAX_HEADS_BYTES)] = "",
        max_nodes: Annotated[int, Range(1, 128)] = 24,
    ) -> None:
        if target.model is None:
            raise InvalidParameter("method medusa reads the target's hidden states: build it through an Engine")
        self.model = target.model
        path = Path(heads) if heads else self._default_file()
        self.heads, vocab, accept = load_heads(path, self.model)
        if self.heads.weight.shape[-1] != self.model.hidden_size or int(vocab.max()) >= self.model.vocab_size:
            raise InvalidParameter(f"the medusa heads {clip(str(path))} do not fit this model's shape")
        self.outside = torch.ones(self.model.vocab_size, dtype=torch.bool)  # tokens the heads never propose
        self.outside[vocab] = False
        paths = best_paths(accept[:, : len(vocab)], max_nodes)  # no rank past the tokens the heads choose from
        self.ranks = 1 + max(max(path) for path in paths)
        index = {path: i + 1 for i, path in enumerate(paths)}
        parents = [-1] + [index.get(path[:-1], 0) for path in paths]
        self.tree = Tree.from_parents(parents)
        self.path_depth = torch.tensor([0] + [len(path) for path in paths])
        self.path_rank = torch.tensor([0] + [path[-1] for path in paths])
        rates = accept.tolist()
        chance = [1.0] + [float(torch.tensor([rates[k][r] for k, r in enumerate(path)]).prod()) for path in paths]
        self.estimates = torch.tensor(chance)
        self.wants_hidden = (self.model.layers,)
        self.hidden: torch.Tensor | None = None  # [H] at the last accepted node of the last step

    def _default_file(self) -> Path:
        trained = self.model.trained_file(KIND)
        if trained.is_file():
            return trained
        shipped = shipped_file(self.model.identity)
        if shipped is None:
            raise InvalidParameter(
                "no medusa heads for this model: train them with `decodekit train medusa --model MODEL` "
                "(or name a heads file: medusa:heads=PATH)"
            )
        return shipped

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.hidden = None

    def propose(self, sequence: torch.Tensor) -> Draft:
        root = sequence[-1:]
        if self.hidden is None:
            return Draft(root, Tree.chain(1))
        with torch.inference_mode():
            logits = self.model.head(self.heads(unit_rms(self.hidden)))  # [K, V]
            logits[:, self.outside] = float("-inf")
            candidates = logits[: int(self.path_depth.max())].topk(self.ranks, dim=-1).indices  # [depth, ranks]
        tokens = candidates[(self.path_depth - 1).clamp(min=0), self.path_rank]
        tokens[0] = root[0]
        return Draft(tokens, self.tree, estimates=self.estimates)

    def observe(self, outcome: StepOutcome) -> None:
        if len(outcome.accepted) != len(outcome.committed):  # inside a hybrid, the path ran on past our nodes:
            self.hidden = None  # the last node's hidden state is not ours to see; draft again after the next step
            return
        self.hidden = outcome.hidden[self.model.layers][int(outcome.accepted[-1])].clone()

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.heads.parameters())
