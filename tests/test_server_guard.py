"""`decodekit serve` against hostile and clumsy clients: method policy, body limit, API key, Host check, strict
types, errors that never echo internals, tokenizing before the queue, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_server import (
    COMPLETION,
    PROMPT,
    assert_error,
    client_for,
    hooked,  # noqa: F401 (a fixture)
    metric,
    post,
    serving,
    wait_for,
)

import decodekit.engine
from decodekit.cli import main
from decodekit.engine import Chunk, Engine
from decodekit.errors import InvalidParameter
from decodekit.server.app import create_app
from decodekit.server.guard import is_loopback

KEY = "sk-test-secret"


@pytest.fixture(scope="module")
def url(tiny_model) -> Iterator[str]:
    """A server with the default client policy (methods by name) but an operator default that sets options."""
    app = create_app(tiny_model, "recycling:tree=16", max_prompt_tokens=100, max_tokens_cap=64, max_body_bytes=2000)
    with serving(app) as base:
        yield base


def complete(url: str, **fields: object) -> httpx.Response:
    return post(url, "/v1/completions", {**COMPLETION, **fields})


# method policy


def test_request_names_a_method_but_sets_no_options_by_default(url, tiny_model):
    lookup = complete(url, method="lookup")
    assert lookup.json()["choices"][0]["text"] == Engine(tiny_model, "lookup").generate(PROMPT, 8, chat=False).text
    default = Engine(tiny_model, "recycling:tree=16").generate(PROMPT, 8, chat=False).text
    assert complete(url).json()["choices"][0]["text"] == default  # no method: the operator's, options and all
    assert complete(url, method="recycling:tree=16").json()["choices"][0]["text"] == default  # named: the same
    assert "not set its options" in assert_error(complete(url, method="recycling:k=4"), 400, "method")
    message = assert_error(complete(url, method="aded:corpus=/etc/passwd"), 400, "method")
    assert "root" not in message


def test_options_within_bounds_when_the_operator_allows_them(tiny_model):
    app = create_app(tiny_model, "ar", allow_methods=["ar", "recycling", "aded"], allow_method_options=True)
    with serving(app) as url:
        expected = Engine(tiny_model, "recycling:k=4").generate(PROMPT, 8, chat=False).text
        assert complete(url, method="recycling:k=4").json()["choices"][0]["text"] == expected
        assert "operator only" in assert_error(complete(url, method="aded:corpus=/etc/passwd"), 400, "method")
        assert "must be in" in assert_error(complete(url, method="recycling:k=8000"), 400, "method")
        message = assert_error(complete(url, method="lookup"), 400, "method")
        assert message.endswith("available: ar, recycling, aded")
        meta = httpx.get(f"{url}/v1/models").json()["data"][0]["decodekit"]
        assert meta["methods"] == ["ar", "recycling", "aded"] and meta["default_method"] == "ar"
        assert meta["method_options"] and meta["strategies"] == []  # no strategy unless the operator allows it


def test_models_list_the_client_policy(url):
    meta = client_for(url).models.list().data[0].model_extra["decodekit"]
    assert meta["default_method"] == "recycling:tree=16" and not meta["method_options"]
    assert {"ar", "recycling", "lookup", "hybrid"} <= set(meta["methods"])


@pytest.mark.parametrize("allow", [["ar", "telepathy"], []])
def test_unknown_allowed_methods_are_refused(tiny_model, allow):
    with pytest.raises(InvalidParameter, match="allowed methods must be some of"):
        create_app(tiny_model, allow_methods=allow)


def test_idle_drafters_stay_within_the_pool_bound_while_others_are_served(tiny_model):
    """Many distinct option sets (each a drafter of its own, kept idle after its request) next to a plain client:
    the pool never holds more than its bound, and the plain client's greedy text is the library's."""
    matrix = tiny_model.cfg.vocab_size * 4  # recycling's bytes per unit of k
    app = create_app(tiny_model, "ar", allow_method_options=True, queue_size=64, drafter_pool_bytes=100 * matrix)
    expected = Engine(tiny_model, "ar").generate(PROMPT, 8, chat=False).text
    with serving(app) as url, ThreadPoolExecutor(8) as pool:
        specs = [f"recycling:k={k}" for k in range(20, 65)]
        floods = [pool.submit(complete, url, method=spec, max_tokens=4) for spec in specs]
        plain = [pool.submit(complete, url, max_tokens=8) for _ in range(4)]
        assert all(f.result().status_code == 200 for f in floods)
        assert all(f.result().json()["choices"][0]["text"] == expected for f in plain)
        held = metric(url, "decodekit:drafter_pool_bytes")
        assert 0 < held <= 100 * matrix


# body limit


def test_body_over_the_limit_gets_413_by_its_length_or_as_it_streams_in(url):
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b" " * 500

    headers = {"content-type": "application/json"}
    by_length = httpx.post(f"{url}/v1/completions", content=b" " * 2001, headers=headers)
    streamed = httpx.post(f"{url}/v1/completions", content=chunks(), headers=headers)
    assert "transfer-encoding" in streamed.request.headers
    for response in (by_length, streamed):
        assert "limit of 2000 bytes" in assert_error(response, 413)
    body = json.dumps({**COMPLETION, "user": "x" * 1903})  # exactly at the limit
    assert len(body) == 2000 and post(url, "/v1/completions", body).status_code == 200


# API key and Host


@pytest.fixture(scope="module")
def keyed_url(tiny_model) -> Iterator[str]:
    with serving(create_app(tiny_model, "ar", api_key=KEY)) as base:
        yield base


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/v1/nowhere"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", KEY, "Bearer"])
def test_every_endpoint_but_health_wants_the_api_key(keyed_url, path, authorization):
    headers = {} if authorization is None else {"authorization": authorization}
    response = httpx.get(f"{keyed_url}{path}", headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == {
        "message": "a valid API key is required: send 'Authorization: Bearer <key>'",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


def test_the_api_key_opens_the_server(keyed_url):
    assert httpx.get(f"{keyed_url}/health").status_code == 200  # no key needed
    with pytest.raises(openai.AuthenticationError):
        client_for(keyed_url).models.list()
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens >= 1
    assert httpx.get(f"{keyed_url}/metrics", headers={"authorization": f"bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:8000", True),
        ("LocalHost:8000", True),
        ("app.localhost:1", True),
        ("127.0.0.1", True),
        ("127.0.0.1:8000", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("[::1]:8000", True),
        ("0.0.0.0", False),
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.evil.example:80", False),
        ("[::1", False),
        ("", False),
    ],
)
def test_loopback_names(host, loopback):
    assert is_loopback(host) is loopback


def test_a_loopback_server_refuses_other_host_names(url, tiny_model):
    for host in ("localhost:8000", "[::1]:8000", "app.localhost"):
        assert httpx.get(f"{url}/v1/models", headers={"host": host}).status_code == 200
    for path in ("/v1/models", "/health"):
        assert "localhost only" in assert_error(httpx.get(f"{url}{path}", headers={"host": "evil.example"}), 400)
    with serving(create_app(tiny_model, "ar", loopback_only=False)) as open_url:
        assert httpx.get(f"{open_url}/v1/models", headers={"host": "evil.example"}).status_code == 200


def test_serving_beyond_loopback_without_a_key_warns(capsys, tmp_path):
    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")]) == 1  # fails at the model
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0 without an API key" in err and err.count("\n") == 2


# types, text and errors


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "3"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "0"}, "temperature"),
        ({"top_k": "5"}, "top_k"),
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
    ],
)
def test_numbers_and_booleans_must_be_json_numbers_and_booleans(url, fields, param):
    assert_error(complete(url, **fields), 400, param)


def test_a_float_takes_a_json_integer(url):
    assert complete(url, temperature=0, top_p=1, seed=3).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {**COMPLETION, "prompt": "hi \ud800 there"}),
        ("/v1/completions", {**COMPLETION, "stop": ["fine", "\udfff"]}),
        ("/v1/completions", {**COMPLETION, "stop": "\ud800"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 4}),
    ],
)
def test_a_lone_surrogate_gets_400(url, path, body):
    raw = json.dumps(body)  # ASCII: the surrogate travels as the escape \ud800, as a JSON client may send it
    assert "\\ud800" in raw or "\\udfff" in raw
    assert "not valid text" in assert_error(post(url, path, raw), 400)


def test_echoed_values_are_clipped(url):
    for fields in ({"method": "x" * 1000}, {"logit_bias": {str(i): 1 for i in range(100)}}):
        message = assert_error(complete(url, **fields), 400)
        assert "x" * 100 not in message and "'50'" not in message  # the echo clipped (the method list is ours)
        assert len(message.partition("; available:")[0]) < 200


def test_an_unexpected_error_says_internal_error_and_logs_its_traceback(url, monkeypatch, caplog):
    def broken(*args: object) -> list[int]:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(decodekit.engine, "encode_prompt", broken)
    message = assert_error(complete(url), 500)
    assert message.startswith("internal error (request id ") and "secret" not in message
    request_id = message.removeprefix("internal error (request id ").removesuffix(")")
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(logged) == 1 and str(logged[0].exc_info[1]) == "secret detail"


# tokenizing before the queue


def test_prompts_are_tokenized_off_the_loop_and_checked_before_the_queue(hooked, monkeypatch):  # noqa: F811
    threads = []

    encode_prompt = decodekit.engine.encode_prompt

    def encode(*args: object) -> list[int]:
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # not on the event loop
        threads.append(threading.current_thread().name)
        return encode_prompt(*args)

    monkeypatch.setattr(decodekit.engine, "encode_prompt", encode)
    release, held = threading.Event(), threading.Event()

    def hold(i: int, chunk: Chunk) -> None:
        held.set()
        release.wait(30)

    with hooked(hold, queue_size=1, max_prompt_tokens=20) as url:
        busy = threading.Thread(target=complete, args=(url,))
        busy.start()
        assert held.wait(30)  # the worker is stuck in a step: only the handler can answer now
        started = time.perf_counter()
        assert "at most 20" in assert_error(complete(url, prompt="fox " * 30), 400)
        assert_error(complete(url, prompt=[10**6]), 400)  # token ids out of the vocabulary
        assert time.perf_counter() - started < 5
        release.set()
        busy.join(30)
    assert threads and "decodekit-worker" not in threads


# draining on SIGTERM: the real command in a process of its own, each decode step slowed to 50 ms

LONG = {**COMPLETION, "prompt": "the lazy dog", "method": "ar"}  # the tiny model's plain greedy text: 200+ tokens

SLOW_SERVE = """
import sys, time
import decodekit.engine as engine

class Slow(engine.Decoding):
    def accept(self, *args, **kwargs):
        time.sleep(0.05)
        return super().accept(*args, **kwargs)

engine.Decoding = Slow
from decodekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


class SlowServer:
    """``decodekit serve`` on the tiny model with ``options``, each decode step slowed to 50 ms."""

    def __init__(self, tiny_dir, *options: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "-c", SLOW_SERVE, "serve", "--model", str(tiny_dir), "--port", port, *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(self.healthy, timeout=120)

    def healthy(self) -> bool:
        assert self.process.poll() is None, self.process.stderr.read()
        try:
            return httpx.get(f"{self.url}/health").status_code == 200
        except httpx.TransportError:
            return False

    def stream(self, max_tokens: int) -> Iterator[str]:
        """The data lines of a streamed LONG completion (one token a step), with usage."""
        body = {**LONG, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            yield from (line.removeprefix("data: ") for line in response.iter_lines() if line)

    def stop(self) -> tuple[int, str]:
        """Exit status and stderr, once the process has ended (killed after 30 s)."""
        try:
            self.process.wait(30)
        finally:
            self.process.kill()
        return self.process.returncode, self.process.stderr.read()


@pytest.fixture
def slow_server(tiny_dir) -> Iterator[Callable[..., SlowServer]]:
    """Start SlowServers: ``slow_server(*options)``; any left running are killed at the end."""
    started: list[SlowServer] = []

    def start(*options: str) -> SlowServer:
        started.append(SlowServer(tiny_dir, *options))
        return started[-1]

    yield start
    for server in started:
        server.process.kill()
        server.process.wait()


def test_sigterm_drains_running_requests_refuses_new_ones_and_exits_0(slow_server):
    server = slow_server()
    events = server.stream(40)
    first = next(events)
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503)
    # still listening while it drains: a late request gets a clean 503
    assert "shutting down" in assert_error(post(server.url, "/v1/completions", COMPLETION), 503)
    rest = list(events)
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(event) for event in [first, *rest[:-1]]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 40
    status, err = server.stop()
    assert status == 0, err
    with pytest.raises(httpx.ConnectError):  # the listener closed after the drain: new connections are refused
        httpx.get(f"{server.url}/health")


def test_drain_timeout_cancels_what_is_left(slow_server):
    server = slow_server("--drain-timeout", "0.5")
    whole = {}
    waiting = threading.Thread(
        target=lambda: whole.update(response=post(server.url, "/v1/completions", {**LONG, "max_tokens": 200})),
        daemon=True,
    )
    events = server.stream(200)  # 10 s of decoding
    next(events)
    waiting.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    rest = list(events)
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == 503
    waiting.join(30)
    assert "shutting down" in assert_error(whole["response"], 503)
    status, err = server.stop()
    assert status == 0, err
    assert time.monotonic() - started < 5 and "drain timeout: 2 request(s) cut short" in err


def test_a_second_signal_forces_exit(slow_server):
    server = slow_server("--drain-timeout", "60")
    events = server.stream(200)
    next(events)
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503)
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    server.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(httpx.TransportError):
        list(events)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-body-bytes", "0"], "--max-body-bytes must be a positive integer"),
        (["--drain-timeout", "-1"], "--drain-timeout must be a number of seconds >= 0"),
        (["--drain-timeout", "nan"], "--drain-timeout must be a number of seconds >= 0"),
        (["--allow-methods", "ar,telepathy"], "allowed methods must be some of"),
        (["--allow-methods", ""], "allowed methods must be some of"),
        (["--api-key", ""], "--api-key (or DECODEKIT_API_KEY) is empty"),
        (["--method", "aded:corpus=/dev/zero"], "not a regular file"),
    ],
)
def test_serve_command_rejects_bad_values(capsys, args, says):
    assert main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
