"""vLLM's speculative configuration (``--speculative-config '{"method": "ngram", ...}'``) read as a decodekit method
spec, so a vLLM user's configuration works here unchanged where we have the method.

Its methods map to ours: ``ngram`` -> ``lookup``, ``suffix`` -> ``suffix``, ``draft_model`` (or a ``model`` without
a method) -> ``draft``, ``medusa`` -> ``medusa``, ``eagle`` -> ``eagle``; ``num_speculative_tokens`` is the draft's
size (``num_tokens`` or ``max_nodes``), ``prompt_lookup_min/max`` the n-gram lengths,
``suffix_decoding_max_tree_depth`` and ``suffix_decoding_min_token_prob`` the suffix tree's depth and threshold,
``model`` the draft checkpoint (medusa, eagle: a decodekit trained file; vLLM's EAGLE checkpoints are another
format). Any other key or method is refused by name, with the ones accepted.
"""

from __future__ import annotations

import json

from decodekit.errors import InvalidParameter, clip

METHODS = {"ngram": "lookup", "suffix": "suffix", "draft_model": "draft", "medusa": "medusa", "eagle": "eagle"}
SIZE = {"lookup": "num_tokens"}  # the option num_speculative_tokens sets where it is not max_nodes
OPTIONS = {  # per method: vLLM key -> our option
    "lookup": {"prompt_lookup_min": "min_ngram", "prompt_lookup_max": "max_ngram"},
    "suffix": {"suffix_decoding_max_tree_depth": "max_depth", "suffix_decoding_min_token_prob": "min_prob"},
    "draft": {"model": "model"},
    "medusa": {"model": "heads"},
    "eagle": {"model": "layer"},
}
KEYS = {"method", "num_speculative_tokens"} | {key for keys in OPTIONS.values() for key in keys}


def method_from_speculative_config(config: str | dict) -> str:
    """The decodekit method spec that ``config`` (vLLM's speculative config: a JSON object or its text) means.
    InvalidParameter for text that is no JSON object, an unknown key or method, or a value the spec cannot carry;
    the spec's options are checked where it is used, as every spec's are."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as err:
            raise InvalidParameter(f"the speculative config is not JSON: {err.msg}") from None
    if not isinstance(config, dict):
        raise InvalidParameter("the speculative config must be a JSON object, as vLLM's --speculative-config is")
    unknown = sorted(set(config) - KEYS)
    if unknown:
        raise InvalidParameter(
            f"speculative config key {clip(unknown[0])} is not supported; the keys are {', '.join(sorted(KEYS))}"
        )
    vllm_method = config.get("method", "draft_model" if "model" in config else None)
    if vllm_method not in METHODS:
        raise InvalidParameter(
            f"speculative config method {clip(vllm_method)} has no decodekit counterpart; the methods are "
            f"{', '.join(METHODS)} (or name one of ours with --method: `decodekit methods` lists them)"
        )
    method = METHODS[vllm_method]
    options: dict[str, object] = {}
    for key, value in config.items():
        if key == "method":
            continue
        name = SIZE.get(method, "max_nodes") if key == "num_speculative_tokens" else OPTIONS[method].get(key)
        if name is None:
            raise InvalidParameter(f"speculative config key {key} does not apply to method {vllm_method}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or any(c in str(value) for c in ",:="):
            raise InvalidParameter(f"speculative config key {key}: {clip(value)} is not a value decodekit can take")
        options[name] = value
    return method + (":" + ",".join(f"{name}={value}" for name, value in options.items()) if options else "")
