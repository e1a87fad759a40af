"""`decodekit serve`: the real server on a loopback port, spoken to with the official openai client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import decodekit.engine
from decodekit.cli import main
from decodekit.engine import Chunk, Decoding, Engine
from decodekit.sampling import SamplingParams
from decodekit.server.app import create_app

PROMPT = "the quick brown fox"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the weather"}]


@contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive())
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(condition: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` with ``labels`` in the server's /metrics scrape (0 when none)."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    samples = [sample for family in families for sample in family.samples if sample.name == name]
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def url(tiny_model) -> Iterator[str]:
    app = create_app(
        tiny_model, "recycling", queue_size=8, max_prompt_tokens=100, max_tokens_cap=64, allow_method_options=True
    )
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return client_for(url)


def test_completion_is_the_library_output(client, tiny_model):
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    expected = Engine(tiny_model, "recycling").generate(PROMPT, 20, chat=False)
    assert reply.object == "text_completion" and reply.model == tiny_model.name
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.stats.finish_reason
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_ids), len(expected.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["mean_accepted_tokens"] >= 1


def test_chat_streamed_equals_whole(client, tiny_model):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    expected = Engine(tiny_model, "recycling").generate(CHAT, 24)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_ends_with_done(url, client):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True, "user": "me"}
    body["frobnicate"] = True  # unknown fields are ignored
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text


def test_stop_strings(client):
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
    stop = free[6:9]
    expected = free[: free.index(stop)]
    for stops in (stop, [stop, "never happens"]):
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0, stop=stops)
        assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=32, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_concurrent_greedy_requests_equal_single_requests(client, tiny_model):
    cases = [
        ("the lazy dog", "recycling"),
        ("it is sunny today", "lookup"),
        ("foxes and dogs", "ar"),
        ("tomorrow it will rain", "recycling:tree=16"),
        ("the river", "suffix"),
        ("the hills", "recycling"),
    ]

    def ask(case: tuple[str, str]) -> tuple[str, str]:
        prompt, method = case
        chat = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=20,
            temperature=0,
            extra_body={"method": method},
        )
        plain = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, extra_body={"method": method}
        )
        return chat.choices[0].message.content, plain.choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(ask, cases))
    for (prompt, method), reply in zip(cases, replies, strict=True):
        engine = Engine(tiny_model, method)
        assert reply == (engine.generate(prompt, 20).text, engine.generate(prompt, 20, chat=False).text), method


def test_seeded_sampling_is_reproducible(client, tiny_model):
    extra = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}  # the server's method: recycling, stateful

    def sample(prompt: str) -> str:
        return (
            client.completions.create(
                model="tiny", prompt=prompt, max_tokens=24, temperature=0.9, top_p=0.95, seed=7, extra_body=extra
            )
            .choices[0]
            .text
        )

    first = sample(PROMPT)
    sample("tomorrow it will rain over the hills")  # teaches the recycling drafter something new
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=7)
    expected = Engine(tiny_model, "recycling").generate(PROMPT, 24, chat=False, sampling=params)
    assert first == sample(PROMPT) == expected.text


def test_models_health_and_metrics(url, client, tiny_model):
    assert [m.id for m in client.models.list()] == [tiny_model.name]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert metric(url, "decodekit:requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric(url, "decodekit:e2e_request_latency_seconds_count", endpoint="/v1/completions") >= 1
    assert metric(url, "decodekit:time_to_first_token_seconds_count") >= 1
    assert metric(url, "decodekit:generation_tokens_total") >= reply.usage.completion_tokens
    drafts = metric(url, "decodekit:spec_decode_num_drafts_total")
    proposed = metric(url, "decodekit:spec_decode_num_draft_tokens_total")
    accepted = metric(url, "decodekit:spec_decode_num_accepted_tokens_total")
    assert proposed >= drafts > 0 and proposed >= accepted
    per_position = metric(url, "decodekit:spec_decode_num_accepted_tokens_per_pos_total")  # summed over positions
    first_position = metric(url, "decodekit:spec_decode_num_accepted_tokens_per_pos_total", position="0")
    assert per_position == accepted and first_position <= drafts


def post(url: str, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error["message"]


COMPLETION = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/v1/completions", '{"prompt": "the quick', None, "not valid JSON"),
        ("/v1/completions", {**COMPLETION, "temperature": -1}, None, "temperature"),
        ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature", "temperature"),
        ("/v1/completions", {**COMPLETION, "method": "telepathy"}, "method", "unknown method"),
        ("/v1/completions", {**COMPLETION, "method": "recycling:k=banana"}, "method", "k"),
        ("/v1/completions", {**COMPLETION, "prompt": "fox " * 150}, None, "at most 100"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 65}, "max_tokens", "cap of 64"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens", "max_tokens"),
        ("/v1/completions", {**COMPLETION, "logprobs": 2}, "logprobs", "not supported"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt", "empty"),
        ("/v1/completions", {"model": "tiny"}, "prompt", "prompt"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": CHAT, "tools": [{"type": "function"}]},
            "tools",
            "not supported",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [*CHAT, {"role": "assistant", "content": "hi"}]},
            None,
            "end with",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
            "text",
        ),
        ("/v1/nowhere", {}, None, "Not Found"),
    ],
)
def test_bad_requests_get_one_line_errors(url, path, body, param, says):
    assert says in assert_error(post(url, path, body), 404 if path == "/v1/nowhere" else 400, param)


def test_n_above_one_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=2)


def test_content_parts_and_developer_role(client, tiny_model):
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "tell me about "}, {"type": "text", "text": "the weather"}],
        },
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == Engine(tiny_model, "recycling").generate(CHAT, 12).text


class HookedDecoding(Decoding):
    """A request's decoding that calls ``hook(i, chunk)`` in the worker after step ``i``: holds or breaks it."""

    hook: Callable[[int, Chunk], None] = staticmethod(lambda i, chunk: None)

    def accept(self, *args, **kwargs) -> Chunk:
        chunk = super().accept(*args, **kwargs)
        HookedDecoding.hook(self.stats.steps - 1, chunk)
        return chunk


@pytest.fixture
def hooked(monkeypatch, tiny_model):
    """Start a server whose requests run ``hook``: ``with hooked(hook, **create_app_options) as url``."""
    monkeypatch.setattr(decodekit.engine, "Decoding", HookedDecoding)

    @contextmanager
    def start(hook: Callable[[int, Chunk], None], **options) -> Iterator[str]:
        monkeypatch.setattr(HookedDecoding, "hook", staticmethod(hook))
        with serving(create_app(tiny_model, method="ar", **options)) as base:
            yield base

    return start


def test_full_queue_gets_429(hooked):
    release, held = threading.Event(), threading.Event()

    def hold(i: int, chunk: Chunk) -> None:
        held.set()
        release.wait(30)

    with hooked(hold, queue_size=1) as url, ThreadPoolExecutor(2) as pool:
        client = client_for(url)
        ask = lambda: client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)  # noqa: E731
        running = pool.submit(ask)
        assert held.wait(30)  # the worker holds the first request
        waiting = pool.submit(ask)
        wait_for(lambda: metric(url, "decodekit:num_requests_waiting") == 1)
        assert_error(post(url, "/v1/completions", COMPLETION), 429)
        with pytest.raises(openai.RateLimitError):
            ask()
        release.set()
        assert running.result().choices[0].text == waiting.result().choices[0].text


def test_client_leaving_mid_stream_cancels_its_generation(hooked):
    release, shown = threading.Event(), []

    def hold_after_first_text(i: int, chunk: Chunk) -> None:
        if shown:  # the client has (or will have) text to read: hold the next chunk until it has left
            release.wait(30)
        if chunk.text:
            shown.append(i)

    with hooked(hold_after_first_text) as url:
        body = {**COMPLETION, "max_tokens": 200, "stream": True, "method": "ar"}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert next(line for line in response.iter_lines() if line.startswith("data: {"))
        wait_for(lambda: metric(url, "decodekit:requests_total", endpoint="/v1/completions", status="499") == 1)
        release.set()
        reply = client_for(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens == 5
        # one token per chunk with plain decoding; the worker stopped at its first check after the client left:
        # after the chunk the client read (if the check came late enough), else after the chunk it held
        assert metric(url, "decodekit:generation_tokens_total") - 5 in (shown[0] + 1, shown[0] + 2)


def test_client_leaving_before_a_whole_reply_cancels_its_generation(hooked):
    release = threading.Event()

    def hold_from_step_two(i: int, chunk: Chunk) -> None:
        if i >= 1:
            release.wait(30)

    with hooked(hold_from_step_two) as url:
        body = {**COMPLETION, "max_tokens": 200}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=1)  # gives up and closes its connection
        wait_for(lambda: metric(url, "decodekit:requests_total", endpoint="/v1/completions", status="499") == 1)
        release.set()
        reply = client_for(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens == 5
        assert metric(url, "decodekit:generation_tokens_total") - 5 <= 3  # stopped at its next step, not at 200


def test_failing_generation_fails_only_its_request(hooked, caplog):
    broken = threading.Event()
    broken.set()

    def explode(i: int, chunk: Chunk) -> None:
        if i == 1 and broken.is_set():
            raise RuntimeError("boom\nsecond line")

    with hooked(explode) as url:
        message = assert_error(post(url, "/v1/completions", COMPLETION), 500)
        request_id = message.removeprefix("the generation failed: internal error (request id ").removesuffix(")")
        assert len(request_id) == 32 and "boom" not in message
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert len(logged) == 1 and "boom" in str(logged[0].exc_info[1])  # the log pairs the id with the traceback
        client = client_for(url)
        with pytest.raises(openai.APIError, match="internal error"):
            list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
        broken.clear()
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--queue-size", "0"], "--queue-size must be a positive integer"),
        (["--max-batch", "0"], "--max-batch must be a positive integer"),
        (["--max-tokens-cap", "-3"], "--max-tokens-cap must be a positive integer"),
        (["--method", "telepathy"], "unknown method"),
    ],
)
def test_serve_command_rejects_bad_options(capsys, args, says):
    assert main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_serve_command_serves(tiny_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "decodekit.cli", "serve", "--model", str(tiny_dir), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def healthy() -> bool:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=120)
        reply = client_for(f"http://127.0.0.1:{port}").completions.create(model="x", prompt=PROMPT, max_tokens=4)
        assert reply.model == tiny_dir.name and reply.usage.completion_tokens <= 4
    finally:
        process.terminate()
        process.wait(30)
