"""Models that drafters run: a separate draft checkpoint or a slice of the target's own layers, each with a KV
cache of its own that follows the committed text.

A :class:`ModelRunner` holds a one-row cache over the layers it runs and the tokens that cache holds. Asked for
the logits after a sequence, it keeps the longest prefix of the sequence it already holds (so a rejected draft is
rewound by shortening the cache, and the accepted path and bonus token are simply the new suffix), scores the rest
and returns the last position's logits. The drafter hands it token ids only; the target's cache is never touched.
:class:`TargetModel` is what the engine gives drafters (``TargetInfo.model``): slices of the target, draft
checkpoints loaded once per engine, and the shapes a drafter may size itself by.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from decodekit.errors import InvalidParameter, clip
from decodekit.protocol import MAX_DRAFT_NODES, DraftModel, EarlyExit, ModelAccess, greedy_choice
from decodekit.runtime import cpu
from decodekit.runtime.kv_cache import rounded_capacity
from decodekit.runtime.loader import LoadedModel, load_model
from decodekit.runtime.model import Transformer

S = TypeVar("S")
CHUNK = 256  # tokens per forward when a runner catches up with a long sequence (a prompt)


class ModelRunner(DraftModel):
    """``transformer`` restricted to ``layers`` (block indices in order; None: every block), over a one-row cache of
    its own, with ``exit`` on top (None: the model's final norm and LM head)."""

    def __init__(
        self, transformer: Transformer, layers: Sequence[int] | None = None, exit: EarlyExit | None = None
    ) -> None:
        self.transformer = transformer
        self.layers = tuple(range(transformer.cfg.layers)) if layers is None else tuple(layers)
        self.exit = exit
        self.cache = transformer.new_cache(0, layers=len(self.layers))
        self.exit_cache = exit.new_cache(0) if exit is not None else None  # positions as in self.cache
        self.tokens = torch.empty(0, dtype=torch.int64)  # what the cache holds: tokens[: cache.lengths[0]]
        self.last_logits: torch.Tensor | None = None  # the logits after all the cache holds

    @property
    def cached(self) -> int:
        return self.cache.lengths[0]

    def logits(self, sequence: torch.Tensor) -> torch.Tensor:
        """float ``[V]``: the logits after ``sequence`` int64 ``[t]``, ``t >= 1``, which the
        cache holds afterwards. Costs a forward over the tokens past the longest prefix it already held (at least
        the last one, unless the cache holds exactly ``sequence``)."""
        sequence = sequence.to(torch.int64).cpu()
        t = sequence.numel()
        n = min(t, self.cached)
        differs = (self.tokens[:n] != sequence[:n]).nonzero()
        keep = int(differs[0]) if differs.numel() else n
        if keep == t == self.cached and self.last_logits is not None:
            return self.last_logits
        keep = min(keep, t - 1)
        self.cache.lengths = [keep]
        if t + MAX_DRAFT_NODES > self.cache.capacity:
            capacity = rounded_capacity(t + MAX_DRAFT_NODES)
            self.cache.grow(capacity)
            self.tokens = torch.cat([self.tokens[:keep], torch.empty(capacity - keep, dtype=torch.int64)])
            if self.exit is not None:
                grown = self.exit.new_cache(capacity)
                grown[:keep] = self.exit_cache[:keep]
                self.exit_cache = grown
        model = self.transformer
        while keep < t:
            n = min(CHUNK, t - keep)
            tokens = sequence[None, keep : keep + n].to(model.device)
            hidden = model.hidden_states(tokens, self.cache, layers=self.layers)[0]
            if self.exit is not None:
                with torch.inference_mode():
                    hidden = self.exit.states(hidden, keep, self.exit_cache)
            self.cache.commit(0, n)
            keep += n
        self.tokens[:t] = sequence
        with torch.inference_mode():
            self.last_logits = model.logits(hidden[-1]) if self.exit is None else self.exit.logits(hidden[-1])
        return self.last_logits

    def greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]``: the greedy choice after each prefix of ``tokens`` int64 ``[n]``, scored alone in a cache
        made for the purpose (the runner's own is left as it is)."""
        model = self.transformer
        cache = model.new_cache(tokens.numel(), layers=len(self.layers))
        hidden = model.hidden_states(tokens[None].to(model.device), cache, layers=self.layers)[0]
        if self.exit is None:
            return greedy_choice(model.logits(hidden)).cpu()
        with torch.inference_mode():
            states = self.exit.states(hidden, 0, self.exit.new_cache(tokens.numel()))
            return greedy_choice(self.exit.logits(states)).cpu()

    def memory_bytes(self) -> int:
        exit_bytes = 0 if self.exit_cache is None else self.exit_cache.numel() * self.exit_cache.element_size()
        return self.cache.kv.numel() * self.cache.kv.element_size() + self.tokens.numel() * 8 + exit_bytes


class TargetModel(ModelAccess):
    """The engine's model as drafters may use it: its shape, slices of it, and draft checkpoints (loaded on the
    first request for each path, kept for the engine's life, on the target's device; a GGUF file on the CPU runs on
    its own quantized weights, anything else in the target's dtype)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.layers = model.cfg.layers
        self.hidden_size = model.cfg.hidden_size
        self.vocab_size = model.cfg.vocab_size
        self.norm_eps = model.cfg.norm_eps
        self._checkpoints: dict[str, LoadedModel] = {}
        self._outputs: dict[bytes, Callable] = {}  # head_over's products by vocabulary
        self._shared: dict[Hashable, object] = {}
        self._shared_lock = threading.Lock()

    @property
    def identity(self) -> str:
        return self.model.identity

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.logits(hidden.to(self.model.dtype))

    def head_over(self, vocab: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        eps = self.norm_eps
        key = vocab.cpu().numpy().tobytes()
        if key not in self._outputs:  # one matrix per vocabulary and engine, however many drafters use it
            self._outputs[key] = self.linear(self.output_map(vocab).T)
        output = self._outputs[key]

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            x = hidden.float()
            return output(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        return logits

    def output_map(self, vocab: torch.Tensor) -> torch.Tensor:
        transformer = self.model.transformer
        return transformer.output_map()[:, vocab.to(transformer.device)].contiguous()

    def shared(self, key: Hashable, make: Callable[[], S]) -> S:
        with self._shared_lock:
            if key not in self._shared:
                self._shared[key] = make()
            return self._shared[key]  # type: ignore[return-value]

    def shared_objects(self) -> list[object]:
        """Every object :meth:`shared` has made so far."""
        with self._shared_lock:
            return list(self._shared.values())

    def linear(self, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        w = weight.detach().float().to(self.model.device).contiguous()
        if w.device.type == "cpu" and w.shape[1] % 32 == 0 and cpu.available():
            packed = cpu.quantize_q8_0(w)
            return lambda x: cpu.quant_linear(x.float(), packed)
        return lambda x: x.float() @ w.T

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.transformer.embedded(tokens.to(self.model.device))

    def trained_file(self, kind: str) -> Path:
        return self.model.trained_file(kind)

    def slice(self, layers: Sequence[int], exit: EarlyExit | None = None) -> ModelRunner:
        layers = list(layers)
        if not layers:
            raise InvalidParameter("a slice of the target needs at least one layer")
        if any(not 0 <= layer < self.layers for layer in layers) or layers != sorted(set(layers)):
            raise InvalidParameter(f"slice layers must be increasing indices in [0, {self.layers}), got {clip(layers)}")
        return ModelRunner(self.model.transformer, layers, exit)

    def checkpoint(self, path: str) -> ModelRunner:
        if path not in self._checkpoints:
            cpu_gguf = Path(path).suffix == ".gguf" and self.model.device.type == "cpu"
            draft = load_model(Path(path), "gguf" if cpu_gguf else self.model.dtype, str(self.model.device))
            if draft.cfg.vocab_size != self.vocab_size:
                raise InvalidParameter(
                    f"the draft model {clip(path)} has a vocabulary of {draft.cfg.vocab_size} tokens, the target "
                    f"{self.vocab_size}: they must share one tokenizer"
                )
            if _vocab(draft.tokenizer) != _vocab(self.model.tokenizer):
                raise InvalidParameter(
                    f"the draft model {clip(path)} has another tokenizer than the target (same size, "
                    f"{self.vocab_size} tokens, different ids): they must share one"
                )
            self._checkpoints[path] = draft
        return ModelRunner(self._checkpoints[path].transformer)


def _vocab(tokenizer: object) -> dict[str, int]:
    return tokenizer.get_vocab()  # type: ignore[attr-defined]
