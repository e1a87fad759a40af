"""The pure-PyTorch path (``DECODEKIT_KERNELS=0``, as where the kernels do not build) on tiny random Llamas.

There a token scored inside a tree need not get bitwise the logits it gets alone (torch's attention sums in an
order that depends on the other queries), so what is tested is what holds: plain greedy equals transformers'
greedy, every method equals plain where the margins are wide (these models'), and sampling draws the model's own
law. Every test here fails if a kernel is called.
"""

import itertools
from dataclasses import replace

import pytest
import torch
from helpers import runnable, write_small_vocab_llama
from test_sampling import chi_square_pvalue
from transformers import AutoModelForCausalLM

from decodekit import Engine, InvalidParameter, SamplingParams, load_model
from decodekit.drafters import METHODS
from decodekit.runtime import cpu, model
from decodekit.sampling import warp

PROMPTS = ["the quick brown fox", "it is sunny today"]


@pytest.fixture(scope="module", autouse=True)
def kernels_off():
    """The switch set before the models load; any call into the kernels fails the test that made it."""
    calls = []

    def no_kernels():
        calls.append(1)
        raise AssertionError("a CPU kernel was called with DECODEKIT_KERNELS=0")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cpu.SWITCH, "0")
        mp.setattr(cpu, "_state", None)  # re-read the switch
        mp.setattr(cpu, "_ops", no_kernels)  # every kernel entry point goes through it
        yield
    assert not calls


@pytest.fixture(scope="module", params=["default", "torch"])
def pure(request, tiny_dir):
    """The tiny Llama with the linear backend taken where the kernels are off (oneDNN where torch has it), and
    with plain torch linears (``DECODEKIT_LINEAR=torch``)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "torch":
            mp.setenv("DECODEKIT_LINEAR", "torch")
        return load_model(tiny_dir)


def test_no_module_takes_a_kernel_path(pure):
    assert not cpu.available()
    for module in pure.transformer.modules():
        assert not getattr(module, "fused", False) and not getattr(module, "cpu_attention", False)
        assert getattr(module, "backend", None) != "small_gemm"
    assert any(isinstance(m, model.Linear) for m in pure.transformer.modules())


def test_asking_for_the_kernel_matmul_with_kernels_off_is_a_clear_error(tiny_dir, monkeypatch):
    monkeypatch.setenv("DECODEKIT_LINEAR", "small_gemm")
    with pytest.raises(InvalidParameter, match="DECODEKIT_LINEAR=small_gemm needs the CPU kernels"):
        load_model(tiny_dir)


def test_plain_greedy_equals_transformers_greedy(pure, tiny_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    engine = Engine(pure, "ar")
    for prompt in PROMPTS:
        ours = engine.generate(prompt, max_new_tokens=40)
        ids = torch.tensor([ours.prompt_ids])
        with torch.no_grad():
            ref = hf.generate(ids, do_sample=False, max_new_tokens=40, pad_token_id=0)[0, ids.shape[1] :]
        assert ours.token_ids == ref.tolist(), prompt


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"ar"}))
def test_every_method_equals_plain(pure, method):
    plain, spec = Engine(pure, "ar"), Engine(pure, runnable(method, pure))
    for prompt in PROMPTS:
        assert spec.generate(prompt, 32).token_ids == plain.generate(prompt, 32).token_ids, prompt


def test_sampling_draws_the_models_law(tmp_path):
    """The first two tokens sampled by a tree method (T=0.8) over an 8-word vocabulary, against their exact law
    from the model's own logits; and one seed, one output."""
    small = load_model(write_small_vocab_llama(tmp_path))
    params = SamplingParams(temperature=0.8, top_p=1.0)
    prompt, vocab, transformer = [0, 3, 5], small.cfg.vocab_size, small.transformer
    exact = {}
    for pair in itertools.product(range(vocab), repeat=2):
        ids = torch.tensor([[*prompt, pair[0]]])
        logits = transformer(ids, transformer.new_cache(ids.shape[1]))[0, -2:]
        exact[pair] = float(warp(logits[0], params)[pair[0]] * warp(logits[1], params)[pair[1]])
    engine = Engine(replace(small, eos_token_ids=frozenset()), "recycling")
    draws = [tuple(engine.generate(prompt, 2, sampling=replace(params, seed=s)).token_ids) for s in range(600)]
    assert chi_square_pvalue(draws, exact) > 1e-3
    again = Engine(small, "recycling").generate(prompt, 2, sampling=replace(params, seed=7))
    assert again.token_ids == list(draws[7])
