"""decodekit's drafters inside transformers' ``generate``: lossless speculative decoding on a transformers model.

``model.generate(**inputs, custom_generate=generate, method="recycling", max_new_tokens=64)``: transformers
prepares the inputs and the generation config, then calls :func:`generate` as its decoding loop. The prompt (all
but its last token) is prefilled into a DynamicCache; then each step the drafter proposes a tree rooted at the last
committed token, one forward of the model scores every node (a 4D mask: the prefix and the node's ancestors;
position ids: prefix length + depth), decodekit's sampler verifies the tree as the engine does (greedy: the output
of ``do_sample=False``; sampling: rejection sampling against transformers' distribution), the cache keeps the
accepted path only, and the drafter observes the outcome. The folder ``custom_generate/`` beside this module holds
the same in the Hub's layout (:func:`hub_generate`).

Only methods that draft from tokens and logits run here (those that run a model need decodekit's runtime); one
sequence, no padding; of transformers' logits processors only those decodekit's sampler applies itself (repetition
penalty, temperature, top-k, top-p, min-p). Anything else is refused with a ValueError. A streamer gets the prompt
only: transformers hands it to no ``custom_generate`` callable.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    PreTrainedConfig,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.generation import (
    EosTokenCriteria,
    GenerateDecoderOnlyOutput,
    MaxLengthCriteria,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from decodekit.decoding import PREFILL_CHUNK, cut_committed
from decodekit.drafters import METHODS, parse_method
from decodekit.drafters.hybrid import Hybrid
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo, Tree
from decodekit.runtime.tree import attention_mask, positions
from decodekit.sampling import Sampler, SamplingParams

# methods whose drafters run (part of) a model through TargetInfo.model, which only decodekit's engine provides
MODEL_METHODS = frozenset({"draft", "pearl", "swift", "s2d", "medusa", "hydra", "kangaroo", "eagle"})
# what transformers builds from a generation config and decodekit's sampler applies itself, and the stops it reads
SAMPLER_PROCESSORS = (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
)
STOPS = (MaxLengthCriteria, EosTokenCriteria)
# model kwargs that transformers' preparation hands on and the loop replaces by its own cache, masks and positions
REPLACED = frozenset({"attention_mask", "position_ids", "cache", "use_cache", "logits_to_keep"})
OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    method: str = "recycling",
    **model_kwargs: object,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """The decoding loop, as ``model.generate(..., custom_generate=generate, method=...)`` calls it after its own
    preparation: ``input_ids`` int64 ``[1, p]``, the processors, stopping criteria and generation config it built
    (``max_length``, EOS, ``do_sample`` and its parameters), ``method`` a decodekit method spec such as
    ``"recycling:k=8"``. Returns int64 ``[1, p + new]`` (in a GenerateDecoderOnlyOutput under
    ``return_dict_in_generate``). Raises ValueError on what it does not support, InvalidParameter (a ValueError) on
    a bad method or option."""
    _check_request(input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
    config = model.config.get_text_config(decoder=True)
    windows = _attention_windows(config)
    params = _sampling(generation_config)
    dtype = str(model.dtype).removeprefix("torch.")
    drafter = _drafter(method, TargetInfo(config.vocab_size, model.device.type, dtype))
    if drafter.samples_drafts and not params.greedy:  # its draws: a stream of their own, from torch's generator
        drafter.generator.manual_seed(_torch_seed())
    prompt = input_ids[0].cpu()
    end = generation_config.max_length  # the sequence's length at most
    sampler = Sampler(params, config.vocab_size, prompt.tolist())
    eos = set(_token_ids(generation_config.eos_token_id))
    sequence = torch.cat([prompt, torch.empty(max(end - len(prompt), 0), dtype=torch.int64)])
    cache = DynamicCache()  # full layers: a sliding window is applied by the masks
    length = len(prompt)
    drafter.begin(prompt, _prefill(model, cache, input_ids[:, :-1], drafter.wants_prompt_logits))
    try:
        while length < end:
            draft = drafter.propose(sequence[:length])
            logits = _score(model, cache, draft, length - 1, windows)
            choices = sampler.greedy_choices(draft.tokens, draft.tree, logits)
            path, bonus = sampler.verify(draft.tokens, draft.tree, logits, choices, draft.candidates, draft.draft_probs)
            _keep_path(cache, length - 1, path, draft.tree.size)
            committed, _ = cut_committed([*draft.tokens[path[1:]].tolist(), bonus], eos, end - length)
            probs = None if params.greedy else partial(sampler.node_probs, logits, draft.tokens, draft.tree)
            drafter.observe(StepOutcome(draft, logits, path, committed, probs, greedy_choices=choices))
            sampler.advance(committed)
            sequence[length : length + len(committed)] = torch.tensor(committed)
            length += len(committed)
            if committed[-1] in eos:
                break
    finally:
        drafter.end()
    sequences = sequence[None, :length].to(input_ids.device)
    return GenerateDecoderOnlyOutput(sequences=sequences) if generation_config.return_dict_in_generate else sequences


def hub_generate(model: PreTrainedModel, **kwargs: object) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """What the Hub layout's ``custom_generate/generate.py`` exposes as ``generate``. transformers calls a folder's
    function with ``generate``'s own arguments, unprepared (``model.generate(..., custom_generate=<folder>,
    trust_remote_code=True)``), so this runs transformers' preparation with :func:`generate` as the loop. Also a
    direct call: ``hub_generate(model, input_ids=ids, method="hybrid", max_new_tokens=64)``."""
    return GenerationMixin.generate(model, custom_generate=generate, **kwargs)


def _check_request(
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    model_kwargs: dict[str, object],
) -> None:
    """Refuse what the loop would not honour, rather than decode something else than asked."""
    where = "decodekit's custom_generate"
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(
            f"{where} decodes one non-empty sequence (batch size 1, num_beams and num_return_sequences 1), "
            f"got input_ids of shape {list(input_ids.shape)}"
        )
    if others := sorted({type(p).__name__ for p in logits_processor if not isinstance(p, SAMPLER_PROCESSORS)}):
        raise ValueError(
            f"{where} applies the repetition penalty, temperature, top_k, top_p and min_p only, not {others}"
        )
    if others := sorted({type(c).__name__ for c in stopping_criteria if not isinstance(c, STOPS)}):
        raise ValueError(f"{where} stops at EOS or max_length/max_new_tokens only, not {others}")
    if asked := [name for name in OUTPUTS if getattr(generation_config, name, None)]:
        raise ValueError(f"{where} returns the sequences only, not {asked}")
    mask, cache = model_kwargs.get("attention_mask"), model_kwargs.get("cache")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        raise ValueError(f"{where} takes no padding: the attention_mask must be all ones")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"{where} starts from the prompt: pass no prefilled cache")
    if others := sorted(name for name, value in model_kwargs.items() if name not in REPLACED and value is not None):
        raise ValueError(f"{where} passes the model input_ids only, not {others}")


def _drafter(method: str, target: TargetInfo) -> Drafter:
    """The drafter ``method`` names (options checked), refusing the methods that run (part of) a model."""
    cls, options = parse_method(method)
    names = {method.strip().partition(":")[0]}
    if cls is Hybrid:
        names |= {part.strip().partition(":")[0] for part in str(options.get("parts", "")).split("+")}
    if refused := sorted(names & MODEL_METHODS):
        usable = ", ".join(name for name in METHODS if name not in MODEL_METHODS)
        raise InvalidParameter(
            f"method {refused[0]} runs (part of) a model, which only decodekit's engine provides; custom_generate "
            f"runs the methods that draft from tokens and logits: {usable}",
            "method",
        )
    return cls(target, **options)


def _sampling(config: GenerationConfig) -> SamplingParams:
    """decodekit's sampling for a generation config: greedy unless ``do_sample``, transformers' repetition penalty,
    temperature, top-k, top-p and min-p, and a seed from torch's global generator (so that ``torch.manual_seed``
    repeats a sampled call, as it does transformers' sampling)."""
    penalty = 1.0 if config.repetition_penalty is None else config.repetition_penalty
    if not config.do_sample:
        return SamplingParams(repetition_penalty=penalty)
    return SamplingParams(
        temperature=1.0 if config.temperature is None else config.temperature,
        top_k=config.top_k or 0,
        top_p=1.0 if config.top_p is None else config.top_p,
        min_p=config.min_p or 0.0,
        repetition_penalty=penalty,
        seed=_torch_seed(),
    )


def _torch_seed() -> int:
    """A seed drawn from torch's global generator."""
    return int(torch.randint(2**63 - 1, ()))


def _token_ids(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _attention_windows(config: PreTrainedConfig) -> dict[str, int | None]:
    """The kinds of attention the model's layers use, as transformers names them, each with its window (None:
    full attention). Raises ValueError on other kinds (chunked, linear)."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    if unknown := sorted(kinds - {"full_attention", "sliding_attention"}):
        raise ValueError(f"decodekit's custom_generate runs full and sliding-window attention only, not {unknown}")
    return {kind: window if kind == "sliding_attention" else None for kind in sorted(kinds)}


def _prefill(model: PreTrainedModel, cache: DynamicCache, tokens: torch.Tensor, want: bool) -> torch.Tensor | None:
    """Score ``tokens`` int64 ``[1, t]`` into ``cache``. Returns, when ``want``, the logits ``[m, V]`` of the last
    ``m = min(t, PREFILL_CHUNK)`` positions (else None; None too when ``t`` is 0)."""
    if tokens.shape[1] == 0:
        return None
    m = min(tokens.shape[1], PREFILL_CHUNK) if want else 1
    logits = model(tokens.to(model.device), cache=cache, use_cache=True, logits_to_keep=m).logits
    return logits[0, -m:] if want else None


def _score(
    model: PreTrainedModel, cache: DynamicCache, draft: Draft, prefix: int, windows: dict[str, int | None]
) -> torch.Tensor:
    """The logits ``[n, V]`` after every node of ``draft``, scored in one forward after the ``prefix`` entries of
    ``cache`` (the nodes' entries are appended to it). One float mask per kind of attention, as a model with
    several kinds takes them (one alone: the tensor)."""
    masks = {kind: _float_mask(prefix, draft.tree, window, model) for kind, window in windows.items()}
    out = model(
        draft.tokens[None].to(model.device),
        attention_mask=masks if len(masks) > 1 else next(iter(masks.values())),
        position_ids=positions([prefix], draft.tree).to(model.device),
        cache=cache,
        use_cache=True,
    )
    return out.logits[0]


def _float_mask(prefix: int, tree: Tree, window: int | None, model: PreTrainedModel) -> torch.Tensor:
    """``[1, 1, n, prefix + n]`` in the model's dtype: 0 where a node may attend (the prefix within ``window``, its
    ancestors and itself), the dtype's minimum elsewhere (what eager and SDPA attention both add to the scores)."""
    allowed = attention_mask([prefix], tree, window).to(model.device)
    return torch.zeros(allowed.shape, dtype=model.dtype, device=model.device).masked_fill_(
        ~allowed, torch.finfo(model.dtype).min
    )


def _keep_path(cache: DynamicCache, prefix: int, path: torch.Tensor, size: int) -> None:
    """Keep in ``cache`` its ``prefix`` entries and those of the accepted nodes ``path`` (int64 ``[m]``, root first)
    of the ``size``-node tree scored after them: node ``path[j]``'s key and value move to slot ``prefix + j``, and
    the slots after the path are cropped."""
    m = len(path)
    if not torch.equal(path, torch.arange(m)):
        for layer in cache.layers:
            slots = (prefix + path).to(layer.keys.device)
            layer.keys[..., prefix : prefix + m, :] = layer.keys[..., slots, :]
            layer.values[..., prefix : prefix + m, :] = layer.values[..., slots, :]
    cache.crop(m - size)
