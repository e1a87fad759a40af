"""vLLM's speculative config read as a decodekit method: the mapping of its methods and keys, the refusals naming
what is accepted, and the CLI's --speculative-config on generate and bench."""

from __future__ import annotations

import json

import pytest

from decodekit import Engine, InvalidParameter
from decodekit.cli import main
from decodekit.engine import check_method, method_from_speculative_config


@pytest.mark.parametrize(
    ("config", "spec"),
    [
        ({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
         "lookup:num_tokens=5,max_ngram=4,min_ngram=2"),
        ({"method": "ngram"}, "lookup"),
        ({"method": "suffix", "num_speculative_tokens": 12, "suffix_decoding_max_tree_depth": 24,
          "suffix_decoding_min_token_prob": 0.1}, "suffix:max_nodes=12,max_depth=24,min_prob=0.1"),
        ({"model": "/models/draft", "num_speculative_tokens": 4}, "draft:model=/models/draft,max_nodes=4"),
        ({"method": "draft_model", "model": "d.gguf"}, "draft:model=d.gguf"),
        ({"method": "medusa", "model": "heads.safetensors", "num_speculative_tokens": 8},
         "medusa:heads=heads.safetensors,max_nodes=8"),
        ({"method": "eagle", "model": "eagle.safetensors", "num_speculative_tokens": 6},
         "eagle:layer=eagle.safetensors,max_nodes=6"),
    ],
)  # fmt: skip
def test_vllm_methods_and_keys_map_to_ours(config, spec):
    assert method_from_speculative_config(config) == spec
    assert method_from_speculative_config(json.dumps(config)) == spec


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"method": "eagle3", "model": "x"}, "method 'eagle3' has no decodekit counterpart; the methods are ngram"),
        ({"num_speculative_tokens": 3}, "method None has no decodekit counterpart"),
        ({"method": "ngram", "disable_by_batch_size": 4}, "key 'disable_by_batch_size' is not supported; the keys"),
        ({"method": "ngram", "model": "x"}, "key model does not apply to method ngram"),
        ({"method": "draft_model", "model": "a,b"}, "key model: 'a,b' is not a value"),
        ({"method": "ngram", "num_speculative_tokens": True}, "is not a value"),
    ],
)
def test_what_cannot_be_read_is_refused_by_name(config, message):
    with pytest.raises(InvalidParameter, match=message):
        method_from_speculative_config(config)


def test_out_of_bounds_values_fail_as_our_options_do():
    spec = method_from_speculative_config({"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(InvalidParameter, match="num_tokens of method lookup: '0' must be in"):
        check_method(spec)


def test_the_mapped_method_decodes_as_plain_decoding_does(tiny_model):
    spec = method_from_speculative_config({"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 3})
    prompt = "a b c a b c a b c"
    assert (
        Engine(tiny_model, spec).generate(prompt, 24).token_ids
        == Engine(tiny_model, "ar").generate(prompt, 24).token_ids
    )


def test_the_cli_takes_it_on_generate_and_refuses_it_beside_a_method(tiny_dir, capsys):
    config = json.dumps({"method": "suffix", "num_speculative_tokens": 8})
    assert main(["generate", "a b c a b c", "--model", str(tiny_dir), "--max-new-tokens", "8", "--json",
                 "--speculative-config", config]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["method"] == "suffix:max_nodes=8"
    assert main(["generate", "hi", "--method", "ar", "--speculative-config", config]) == 1
    assert "give --method or --speculative-config, not both" in capsys.readouterr().err
    assert main(["bench", "--speculative-config", json.dumps({"method": "mtp"})]) == 1
    assert "method 'mtp' has no decodekit counterpart" in capsys.readouterr().err
