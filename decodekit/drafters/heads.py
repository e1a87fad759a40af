"""What the trained-head drafters (``medusa``, ``hydra``) share: their file, the target check, the static tree
chosen from measured accept rates, and the drafter's outline. The file and the target check serve every trained
drafter (``kangaroo`` too).

A trained file (safetensors) holds the part's weights (bfloat16), ``vocab`` (int64 ``[S]``: the tokens it was
trained to choose among, the tokens of the target's training answers) and ``accept`` (float ``[K, R]``: how
often the rank-r candidate at depth k was the target's token, measured on held-out answers), with the kind, the
format and the target's identity (``ModelAccess.identity``) in its metadata. ``decodekit train KIND`` writes it
(decodekit/train/heads.py); a drafter finds it by its ``heads`` option, else where ``train`` writes by default for
the target, else among the package's shipped files (``decodekit/data/KIND-NAME-IDENTITY.safetensors``).

Every head reads the residual stream leaving the target's last block at the last accepted node of the step just
verified (``StepOutcome.hidden``; there the target's own head chose the token that is now the root) and turns
vectors of that stream into logits over its vocabulary with the target's final norm and LM head
(:meth:`ModelAccess.head_over`: read once into a float matrix of the few thousand tokens the heads choose among).
The tree is Medusa's: the ``max_nodes`` rank paths with the highest product of accept rates. Drafts are
deterministic, so verification accepts a node with the target's probability of its token: greedy output equals
``ar`` and sampled output follows the target. The first step of a request drafts nothing (no hidden state yet), nor,
inside a hybrid, a step after one whose accepted path ran past this drafter's nodes (its last hidden state is then
another part's).
"""

from __future__ import annotations

import heapq
import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, TypeVar

import torch

from decodekit.drafters.options import FilePath, OperatorRange, Range, checked_options
from decodekit.errors import InvalidParameter, ModelFileError, clip
from decodekit.protocol import Draft, Drafter, ModelAccess, StepOutcome, TargetInfo, Tree

if TYPE_CHECKING:
    from decodekit.drafters.online import OnlineLearner

FORMAT = 1
MAX_TRAINED_BYTES = 1 << 30
T = TypeVar("T", bound="TrainedPart")


def unit_rms(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [..., H]`` scaled to a root mean square of 1 (float32)."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class TrainedPart(torch.nn.Module):
    """A part trained for a target by ``decodekit train KIND``, built as ``cls(depth, hidden)``: ``depth`` is the
    one number that shapes it besides the target's ``hidden`` size (heads: the tokens ahead; Kangaroo's adapter:
    the target layers under it)."""

    kind: ClassVar[str]
    # prefixes of weights that a file of this kind may lack (parts added to the kind after such files were
    # written): they keep the values they are built with
    optional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, depth: int, hidden: int) -> None:
        super().__init__()
        self.depth, self.hidden = depth, hidden


class TrainedHeads(TrainedPart):
    """Heads for ``depth`` tokens ahead over ``hidden``-wide states. Zero-initialized output weights make every
    head repeat the target's own guess for the root: training starts there."""

    def states(self, z: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: ``z [B, H]`` (the unit-RMS hidden state at t) and ``embedded [B, K, H]`` (the target's
        embeddings of the tokens at t + 1 .. t + K) -> ``[B, K, H]``, the vectors whose logits guess the tokens at
        t + 2 .. t + K + 1."""
        raise NotImplementedError


def head_logits(
    heads: TrainedHeads, hidden: torch.Tensor, embedded: torch.Tensor, output: torch.Tensor, eps: float
) -> torch.Tensor:
    """Teacher-forced logits ``[B, K, S]`` for training: from residual-stream rows ``hidden [B, H]``, the
    embeddings of the tokens after them ``embedded [B, K, H]``, and the target's final norm and LM head as one
    matrix ``output [H, S]`` (:meth:`ModelAccess.output_map`) with the norm's ``eps``."""
    r = heads.states(unit_rms(hidden), embedded)
    return (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)) @ output


def save_trained(path: Path, heads: TrainedPart, vocab: torch.Tensor, accept: torch.Tensor, meta: dict) -> None:
    """Write a trained file (see the module docstring); ``meta`` holds at least ``identity``."""
    from safetensors.torch import save_file

    tensors = {
        f"heads.{name}": value.detach().to(torch.bfloat16).contiguous() for name, value in heads.state_dict().items()
    }
    tensors |= {"vocab": vocab.to(torch.int64).contiguous(), "accept": accept.float().contiguous()}
    header = {"kind": heads.kind, "format": str(FORMAT), "depth": str(heads.depth), "meta": json.dumps(meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, partial, metadata=header)
    partial.replace(path)


def load_trained(path: Path, cls: type[T], target: ModelAccess) -> tuple[T, torch.Tensor, torch.Tensor]:
    """The part (for inference: :func:`for_inference`), vocabulary and accept rates of a ``cls.kind`` trained file
    made for ``target``; ModelFileError where the file cannot be read or is of another kind, InvalidParameter where
    it was trained for other weights."""
    part, vocab, accept = read_trained(path, cls, target)
    return for_inference(part, target), vocab, accept


def read_trained(path: Path, cls: type[T], target: ModelAccess) -> tuple[T, torch.Tensor, torch.Tensor]:
    """:func:`load_trained`'s part as trained: float32 ``torch.nn`` modules, in training mode."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as err:  # safetensors raises assorted errors on damaged files
        raise ModelFileError(f"cannot read {cls.kind} file {path}: {err}") from None
    if header.get("kind") != cls.kind or header.get("format") != str(FORMAT):
        raise ModelFileError(f"{path} is not a {cls.kind} file of format {FORMAT}")
    meta = json.loads(header.get("meta", "{}"))
    if meta.get("identity") != target.identity:
        raise InvalidParameter(
            f"the {cls.kind} file {path} was trained for other weights ({meta.get('model', '?')}); train one "
            f"for this model: decodekit train {cls.kind} --model ..."
        )
    heads = cls(int(header["depth"]), target.hidden_size)
    state = {name.removeprefix("heads."): value.float() for name, value in tensors.items() if name.startswith("heads.")}
    try:
        missing, unexpected = heads.load_state_dict(state, strict=False)
    except RuntimeError:
        missing, unexpected = ["?"], []
    if unexpected or not all(name.startswith(cls.optional) for name in missing):
        raise InvalidParameter(f"the {cls.kind} file {clip(str(path))} does not fit this model's shape")
    vocab = tensors["vocab"]
    if int(vocab.max()) >= target.vocab_size:
        raise InvalidParameter(f"the {cls.kind} file {clip(str(path))} does not fit this model's vocabulary")
    return heads, vocab, tensors["accept"]


def for_inference(part: T, target: ModelAccess) -> T:
    """``part`` (changed in place) frozen for drafting, its linear layers as the runtime runs them fastest."""
    part.eval().requires_grad_(False)
    for module in list(part.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, RuntimeLinear(child, target))
    return part


class RuntimeLinear(torch.nn.Module):
    """A trained part's linear layer in the runtime's form (:meth:`ModelAccess.linear`), for inference."""

    def __init__(self, linear: torch.nn.Linear, target: ModelAccess) -> None:
        super().__init__()
        self.product = target.linear(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.weight_bytes = linear.weight.numel() * 4  # at most: the runtime's form is no larger than float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        return y if self.bias is None else y + self.bias


def part_bytes(part: torch.nn.Module) -> int:
    """About the bytes a loaded trained part's weights take."""
    linears = sum(m.weight_bytes for m in part.modules() if isinstance(m, RuntimeLinear))
    return linears + sum(p.numel() * p.element_size() for p in part.parameters())


def shipped_file(kind: str, identity: str) -> Path | None:
    """The ``kind`` file shipped in the package for the weights ``identity`` names, if any."""
    for entry in files("decodekit").joinpath("data").iterdir():
        if entry.name.startswith(f"{kind}-") and entry.name.endswith(f"-{identity}.safetensors"):
            return Path(str(entry))
    return None


def default_file(model: ModelAccess, kind: str, option: str) -> Path:
    """The ``kind`` file for ``model`` where a method's ``option`` names none: the one ``decodekit train`` wrote
    into the cache, else the one shipped in the package; InvalidParameter naming the command when neither is."""
    trained = model.trained_file(kind)
    if trained.is_file():
        return trained
    shipped = shipped_file(kind, model.identity)
    if shipped is None:
        raise InvalidParameter(
            f"no {kind} file for this model: train it with `decodekit train {kind} --model MODEL` "
            f"(or name one: {kind}:{option}=PATH)"
        )
    return shipped


def best_paths(accept: torch.Tensor, max_nodes: int) -> list[tuple[int, ...]]:
    """Medusa's tree: the ``max_nodes`` rank paths ``(r_1, ..., r_d)`` (the rank-r_d candidate at depth d) with
    the highest chance ``prod accept[k - 1, r_k]``, best first; a path's prefixes are among them and come before
    it. ``accept`` float ``[K, R]``."""
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
class HeadsDrafter(Drafter):
    """A drafter of trained heads (see the module docstring), with their options: ``heads`` (a heads file; default:
    the one trained or shipped for the target), ``max_nodes`` (the tree's nodes, root excluded) and ``learn`` (a
    learning rate: above 0, the heads keep learning from every request the engine decodes; online speculative
    decoding, decodekit/drafters/online.py; set by the operator only). A subclass names its ``heads_class`` and
    implements :meth:`candidates`."""

    heads_class: ClassVar[type[TrainedHeads]]
    wants_step_logits = False

    def __init__(
        self,
        target: TargetInfo,
        heads: Annotated[str, FilePath(MAX_TRAINED_BYTES)] = "",
        max_nodes: Annotated[int, Range(1, 128)] = 24,
        learn: Annotated[float, OperatorRange(0.0, 0.01)] = 0.0,
    ) -> None:
        kind = self.heads_class.kind
        if target.model is None:
            raise InvalidParameter(f"method {kind} reads the target's hidden states: build it through an Engine")
        self.model = target.model
        path = Path(heads) if heads else default_file(self.model, kind, "heads")
        self.learner: OnlineLearner | None = None
        if learn > 0:  # one learner per engine, file and rate, fed by every request
            from decodekit.drafters.online import HeadsObjective, TrafficRows, learner  # they build on this module

            self.learner = learner(self.model, path, self.heads_class, learn, HeadsObjective)
            self.heads, self.vocab, accept = self.learner.current, self.learner.vocab, self.learner.accept
            self.rows = TrafficRows(self.learner.training.depth)
        else:
            self.heads, self.vocab, accept = load_trained(path, self.heads_class, self.model)
        self.logits = self.model.head_over(self.vocab)  # the target's output layer over the heads' tokens
        self.paths = best_paths(accept[:, : len(self.vocab)], max_nodes)  # no rank past the tokens they choose from
        self.ranks = 1 + max(max(path) for path in self.paths)
        index = {path: i + 1 for i, path in enumerate(self.paths)}
        self.parents = [-1] + [index.get(path[:-1], 0) for path in self.paths]
        self.tree = Tree.from_parents(self.parents)
        rates = accept.tolist()
        chances = [1.0]
        for path in self.paths:
            chances.append(chances[self.parents[len(chances)]] * rates[len(path) - 1][path[-1]])
        self.estimates = torch.tensor(chances)
        self.wants_hidden = (self.model.layers,)
        self.hidden: torch.Tensor | None = None  # [H] at the last accepted node of the last step
        self.lay_out()

    def lay_out(self) -> None:
        """What a subclass derives once from the tree (``self.paths``, ``self.parents``) to fill it quickly."""

    def candidates(self, z: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]``: the draft's tokens (``tokens[0]`` the root) laid out as ``self.paths``, from ``z``
        ``[H]`` (the unit-RMS hidden state) and the root token ``[1]``."""
        raise NotImplementedError

    def top(self, states: torch.Tensor) -> torch.Tensor:
        """int64 ``[..., ranks]``: the best tokens of the heads' vocabulary after ``states`` ``[..., H]``."""
        return self.vocab[self.logits(states).topk(self.ranks, dim=-1).indices]

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.hidden = None
        if self.learner is not None:
            self.rows.begin(int(prompt[-1]))

    def propose(self, sequence: torch.Tensor) -> Draft:
        root = sequence[-1:]
        if self.hidden is None:
            return Draft(root, Tree.chain(1))
        if self.learner is not None:
            self.heads = self.learner.current  # the latest heads it published
        with torch.inference_mode():
            tokens = self.candidates(unit_rms(self.hidden), root)
        return Draft(tokens, self.tree, estimates=self.estimates)

    def observe(self, outcome: StepOutcome) -> None:
        ours = len(outcome.accepted) == len(outcome.committed)  # else, inside a hybrid, the path ran on past our
        # nodes: the last node's hidden state is not ours to see; draft again after the next step
        states = outcome.hidden[self.model.layers][outcome.accepted] if ours else None
        self.hidden = None if states is None else states[-1]
        if self.learner is not None:
            self.learner.add(self.rows.step(states, outcome.committed))

    def memory_bytes(self) -> int:
        return part_bytes(self.heads)
