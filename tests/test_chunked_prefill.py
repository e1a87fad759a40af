"""Chunked prefill on tiny random Llamas: outputs independent of the chunking, a long prompt joining a batch a
chunk at a time beside live rows, rows leaving while others join, and the server streaming beside a long prompt."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import write_tiny_llama
from test_batch import Broken, decoding
from test_server import client_for, metric, serving, wait_for

import decodekit.engine
from decodekit import Engine
from decodekit.batch import Batch
from decodekit.decoding import Decoding, Request, target_info
from decodekit.drafters import make_drafter
from decodekit.drafters.ar import Autoregressive
from decodekit.runtime import cpu
from decodekit.runtime.loader import load_model
from decodekit.sampling import GREEDY
from decodekit.server.app import create_app

SHORT = ["the quick brown fox", "a b c a b c a b c a b c", "tell me about the weather tomorrow in the hills"]
LONG = "It is sunny today, and tomorrow it will rain over the hills and the river. " * 6  # ~170 tokens
METHODS = ["ar", "recycling", "aded:seed_logits=true", "lookup", "hybrid"]


@pytest.fixture
def chunk(monkeypatch):
    """Set ``decodekit.decoding.PREFILL_CHUNK`` (tokens per prefill forward) for the test."""
    return lambda tokens: monkeypatch.setattr("decodekit.decoding.PREFILL_CHUNK", tokens)


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_gives_the_unchunked_output(tiny_model, chunk, method):
    chunk(10**6)
    whole = [Engine(tiny_model, method).generate(prompt, 30).token_ids for prompt in (LONG, SHORT[1])]
    plain = [Engine(tiny_model, "ar").generate(prompt, 30).token_ids for prompt in (LONG, SHORT[1])]
    chunk(4)
    engine = Engine(tiny_model, method)  # one engine for both: drafter state carries over, output must not care
    assert [engine.generate(prompt, 30).token_ids for prompt in (LONG, SHORT[1])] == whole == plain


class Recording(Autoregressive):
    """Plain decoding that keeps the prompt logits it is handed."""

    wants_prompt_logits = True

    def __init__(self) -> None:
        pass

    def begin(self, prompt, prompt_logits):
        self.prompt, self.prompt_logits = prompt, prompt_logits


@pytest.mark.parametrize("tokens", [4, 7, 1000])
def test_a_drafter_gets_the_logits_of_the_last_chunk(tiny_model, chunk, tokens):
    chunk(tokens)
    ids = Engine(tiny_model, "ar").request(LONG).prompt_ids
    recording = Recording()
    request = Decoding(tiny_model, recording, "recording", Request(ids, 4, sampling=GREEDY))
    cache = tiny_model.transformer.new_cache(request.capacity)
    assert request.prefill(cache) == len(ids) - 1 and request.prefilled
    assert cache.lengths == [len(ids) - 1] and recording.prompt.tolist() == ids
    m = min(len(ids) - 1, tokens)
    whole = tiny_model.transformer(torch.tensor([ids[:-1]]), tiny_model.transformer.new_cache(len(ids)))[0]
    assert recording.prompt_logits.shape == (m, tiny_model.cfg.vocab_size)
    torch.testing.assert_close(recording.prompt_logits, whole[-m:], rtol=0, atol=1e-4)


def test_prefill_scores_whole_chunks_within_its_budget(tiny_model, chunk):
    chunk(4)
    ids = Engine(tiny_model, "ar").request(LONG).prompt_ids  # p - 1 = 4k + r: the first chunk holds r tokens
    request = decoding(tiny_model, "ar", LONG, 4)
    cache = tiny_model.transformer.new_cache(request.capacity)
    first = (len(ids) - 2) % 4 + 1
    assert request.prefill(cache, budget=1) == first  # at least one chunk, whatever the budget
    assert request.prefill(cache, budget=11) == 8  # two chunks fit, the third would not
    assert cache.lengths == [first + 8] and not request.prefilled
    assert request.prefill(cache) == len(ids) - 1 - first - 8 and request.prefilled


@pytest.mark.skipif(not cpu.available(), reason="the CPU kernels did not build")
def test_with_the_cpu_attention_kernel_chunked_entries_are_bitwise_the_unchunked(tmp_path, chunk):
    """Each query of the kernel is bitwise a function of the keys it sees (torch's attention, which the tiny model's
    head_dim 16 takes, differs in the last bits with the number of queries)."""
    model = load_model(write_tiny_llama(tmp_path, hidden_size=128, num_attention_heads=2, num_key_value_heads=1))
    assert model.transformer.blocks[0].cpu_attention
    ids = Engine(model, "ar").request(LONG).prompt_ids

    def entries(tokens: int) -> torch.Tensor:
        chunk(tokens)
        request = Decoding(model, make_drafter("ar", target_info(model)), "ar", Request(ids, 4))
        cache = model.transformer.new_cache(request.capacity)
        request.prefill(cache)
        return cache.kv[..., : len(ids) - 1, :]

    assert torch.equal(entries(256), entries(5))


def check_layout(batch: Batch) -> None:
    """The batch's invariant: live rows first, each with its committed sequence (all but its root) in its cache
    row, then the joining rows in order, only the first partly prefilled."""
    lengths = batch.cache.lengths
    for b, row in enumerate(batch.rows):
        assert row.decoding.prefilled and lengths[b] == row.decoding.length - 1
    for j, row in enumerate(batch.joining):
        assert not row.decoding.prefilled and lengths[len(batch.rows) + j] == row.decoding.prompt_scored
        assert j == 0 or row.decoding.prompt_scored == 0


def step(batch: Batch) -> dict:
    """One step; done requests leave. Returns each request's chunk."""
    results = dict(batch.step())
    for request, result in results.items():
        assert not isinstance(result, Exception)
        if request.done:
            batch.leave(request)
    check_layout(batch)
    return results


def finish(batch: Batch) -> None:
    while batch.size:
        step(batch)


@pytest.mark.parametrize("method", ["recycling", "aded:seed_logits=true"])
def test_a_long_prompt_joins_a_chunk_a_step_beside_live_rows(tiny_model, chunk, method):
    chunk(4)
    live = [decoding(tiny_model, "ar", prompt, 100) for prompt in SHORT[:2]]  # a token a step, past the prefill
    long = decoding(tiny_model, method, LONG, 20)
    batch = Batch(tiny_model, max_rows=3, capacity=512, adaptive=True, prefill_chunk=4)
    for request in live:
        batch.join(request)
    while batch.joining:
        step(batch)
    batch.join(long)
    steps = 0
    while not long.prefilled:
        before = long.prompt_scored
        chunks = step(batch)
        assert all(len(chunks[request].token_ids) == 1 for request in live)  # every live row decodes
        assert long.prompt_scored - before <= 4
        steps += 1
    assert steps == -(-(len(long.prompt_ids) - 1) // 4)  # a chunk a step
    finish(batch)
    for request, prompt, n in [(live[0], SHORT[0], 100), (live[1], SHORT[1], 100), (long, LONG, 20)]:
        assert request.result().token_ids == Engine(tiny_model, request.method).generate(prompt, n).token_ids


def test_rows_leave_while_a_long_prompt_is_half_prefilled(tiny_model, chunk):
    chunk(8)
    live = [decoding(tiny_model, "recycling", prompt, 60) for prompt in SHORT]
    batch = Batch(tiny_model, max_rows=6, capacity=512, adaptive=False, prefill_chunk=8)
    for request in live:
        batch.join(request)
    while batch.joining:
        step(batch)
    long, after, last = [decoding(tiny_model, "recycling", prompt, 20) for prompt in (LONG, SHORT[2], SHORT[0])]
    for request in (long, after, last):
        batch.join(request)
    for _ in range(3):
        step(batch)
    assert 0 < long.prompt_scored < len(long.prompt_ids) - 1 and after.prompt_scored == 0
    batch.leave(live[0])  # a live row: the last live row takes its place, the joining rows move down one
    check_layout(batch)
    batch.leave(after)  # a joining row behind the head
    check_layout(batch)
    finish(batch)
    for request, prompt, n in [
        (live[1], SHORT[1], 60),
        (live[2], SHORT[2], 60),
        (long, LONG, 20),
        (last, SHORT[0], 20),
    ]:
        assert request.result().token_ids == Engine(tiny_model, "recycling").generate(prompt, n).token_ids


def test_the_half_prefilled_head_leaves(tiny_model, chunk):
    chunk(8)
    live = decoding(tiny_model, "lookup", SHORT[1], 40)
    long, short = decoding(tiny_model, "recycling", LONG, 20), decoding(tiny_model, "recycling", SHORT[2], 20)
    batch = Batch(tiny_model, max_rows=3, capacity=512, adaptive=True, prefill_chunk=8)
    batch.join(live)
    while batch.joining:
        step(batch)
    batch.join(long)
    batch.join(short)
    step(batch)
    step(batch)
    assert live.prefilled and long.prompt_scored > 0 and short.prompt_scored == 0
    batch.leave(long)
    check_layout(batch)
    finish(batch)
    assert short.result().token_ids == Engine(tiny_model, "recycling").generate(SHORT[2], 20).token_ids
    assert live.result().token_ids == Engine(tiny_model, "lookup").generate(SHORT[1], 40).token_ids


def test_a_short_prompt_goes_before_a_long_one_half_in(tiny_model, chunk):
    chunk(8)
    live = decoding(tiny_model, "ar", SHORT[1], 100)
    long, short = decoding(tiny_model, "recycling", LONG, 20), decoding(tiny_model, "aded", SHORT[0], 20)
    batch = Batch(tiny_model, max_rows=3, capacity=512, adaptive=True, prefill_chunk=32)
    batch.join(live)
    while batch.joining:
        step(batch)
    batch.join(long)
    step(batch)
    scored = long.prompt_scored
    assert 24 < scored <= 32  # whole chunks of 8 within the budget of 32
    batch.join(short)
    assert short in step(batch)  # it fits whole in the step's budget: it goes first, and decodes at once
    assert batch.joining[0].decoding is long and long.prompt_scored == scored  # what was left was not a chunk
    step(batch)
    assert long.prompt_scored > scored
    finish(batch)
    assert long.result().token_ids == Engine(tiny_model, "recycling").generate(LONG, 20).token_ids
    assert short.result().token_ids == Engine(tiny_model, "aded").generate(SHORT[0], 20).token_ids
    assert live.result().token_ids == Engine(tiny_model, "ar").generate(SHORT[1], 100).token_ids


def test_several_short_prompts_go_live_in_one_step(tiny_model):
    requests = [decoding(tiny_model, "recycling", prompt, 10) for prompt in SHORT]
    batch = Batch(tiny_model, max_rows=3, capacity=512, adaptive=False)  # a budget of 256 tokens a step
    for request in requests:
        batch.join(request)
    assert batch.full and not batch.rows
    results = batch.step()
    assert [request for request, _ in results] == requests and not batch.joining
    finish(batch)
    for request, prompt in zip(requests, SHORT, strict=True):
        assert request.result().token_ids == Engine(tiny_model, "recycling").generate(prompt, 10).token_ids


class BrokenBegin(Broken):
    def begin(self, prompt, prompt_logits):
        raise RuntimeError("drafter bug at begin")


def test_a_failing_prefill_fails_only_its_row(tiny_model):
    ids = Engine(tiny_model, "ar").request(SHORT[0]).prompt_ids
    live = decoding(tiny_model, "recycling", SHORT[1], 10)
    broken = Decoding(tiny_model, BrokenBegin(), "broken", Request(ids, 10, sampling=GREEDY))
    after = decoding(tiny_model, "recycling", SHORT[2], 10)
    batch = Batch(tiny_model, max_rows=3, capacity=512, adaptive=False)
    batch.join(live)
    step(batch)
    batch.join(broken)
    batch.join(after)
    results = dict(batch.step())
    assert isinstance(results[broken], RuntimeError) and not isinstance(results[live], Exception)
    batch.leave(broken)
    check_layout(batch)
    finish(batch)
    assert live.result().token_ids == Engine(tiny_model, "recycling").generate(SHORT[1], 10).token_ids
    assert after.result().token_ids == Engine(tiny_model, "recycling").generate(SHORT[2], 10).token_ids


def test_the_server_streams_beside_a_long_prompt(tiny_model, chunk, monkeypatch):
    """While a long prompt is prefilled, a chunk a step, a live stream gets a token every step."""
    chunk(4)
    log: list[tuple[str, Decoding]] = []  # the worker's prefill and accept calls, in order
    release = threading.Event()

    class Logged(Decoding):
        def prefill(self, *args, **kwargs) -> int:
            log.append(("prefill", self))
            return super().prefill(*args, **kwargs)

        def accept(self, *args, **kwargs):
            log.append(("accept", self))
            if self.stats.steps == 1:  # hold the stream's second step until the long prompt has come
                release.wait(30)
            return super().accept(*args, **kwargs)

    monkeypatch.setattr(decodekit.engine, "Decoding", Logged)
    app = create_app(tiny_model, method="ar", max_prompt_tokens=200, max_tokens_cap=150, prefill_chunk=4)
    with serving(app) as url, ThreadPoolExecutor(2) as pool:
        client = client_for(url)
        ask = lambda prompt, n: client.completions.create(model="x", prompt=prompt, max_tokens=n, temperature=0)  # noqa: E731
        short = pool.submit(ask, SHORT[1], 150)
        wait_for(lambda: len(log) >= 2)
        long = pool.submit(ask, LONG, 4)
        long_seen = lambda: any(len(request.prompt_ids) > 100 for _, request in log)  # noqa: E731
        wait_for(lambda: metric(url, "decodekit:num_requests_waiting") == 1 or long_seen())
        release.set()
        assert short.result().choices[0].text == Engine(tiny_model, "ar").generate(SHORT[1], 150, chat=False).text
        assert long.result().choices[0].text == Engine(tiny_model, "ar").generate(LONG, 4, chat=False).text
    long_request = next(request for _, request in log if len(request.prompt_ids) > 100)
    prefills = [i for i, (call, request) in enumerate(log) if call == "prefill" and request is long_request]
    assert len(prefills) == -(-(len(long_request.prompt_ids) - 1) // 4)  # a chunk a step
    between = log[prefills[0] : prefills[-1]]
    assert sum(call == "accept" and request is not long_request for call, request in between) == len(prefills) - 1


def test_a_client_leaving_while_its_prompt_is_prefilled_frees_its_row(tiny_model, chunk, monkeypatch):
    chunk(4)
    prefills: list[Decoding] = []
    release = threading.Event()

    class Held(Decoding):
        def prefill(self, *args, **kwargs) -> int:
            prefills.append(self)
            if len(prefills) == 3:  # the long prompt's third chunk waits until its client has left
                release.wait(30)
            return super().prefill(*args, **kwargs)

    monkeypatch.setattr(decodekit.engine, "Decoding", Held)
    with serving(create_app(tiny_model, method="ar", max_prompt_tokens=200, prefill_chunk=4)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": LONG, "max_tokens": 4}, timeout=1)
        wait_for(lambda: metric(url, "decodekit:requests_total", endpoint="/v1/completions", status="499") == 1)
        release.set()
        wait_for(lambda: metric(url, "decodekit:num_requests_running") == 0)
        assert len(prefills) <= 3  # no chunk after the client left (of about 40)
        reply = client_for(url).completions.create(model="x", prompt=SHORT[1], max_tokens=5, temperature=0)
        assert reply.choices[0].text == Engine(tiny_model, "ar").generate(SHORT[1], 5, chat=False).text
