"""The echo engine seen from outside: a real subprocess, real sockets, real HTTP.

Workers and the router only ever talk to an engine over HTTP, so these tests do the same; an
in-process ASGI test would miss what matters most here (SSE that really arrives token by token,
metrics that reflect requests in flight on another connection, the startup 503).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

API_KEY = "test-key"
MODEL = "echo-test"
SLOW_TOKEN_DELAY_S = 0.05


@dataclass
class Engine:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def url(self, path: str) -> str:
        return self.base_url + path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The module entry point runs the very command `inventiv engine echo` mounts, and starts faster.
ECHO_MODULE = ("inventiv.engines.echo",)


def _spawn(log: Path, *options: str, entry: tuple[str, ...] = ECHO_MODULE) -> Engine:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        *entry,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *options,
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    return Engine(process, f"http://127.0.0.1:{port}", log)


def _first_answer(engine: Engine, timeout_s: float = 15.0) -> httpx.Response:
    """Poll /health until the engine answers anything at all, and return that first answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            pytest.fail(f"echo engine exited early:\n{engine.log.read_text()}")
        try:
            return httpx.get(engine.url("/health"), timeout=1.0)
        except httpx.TransportError:
            time.sleep(0.02)
    pytest.fail(f"echo engine did not answer within {timeout_s}s:\n{engine.log.read_text()}")


def _stop(engine: Engine) -> None:
    engine.process.terminate()
    try:
        engine.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        engine.process.kill()
        engine.process.wait(timeout=5)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Engine]]:
    """A fast engine behind an API key, and a slow one limited to one request at a time.

    Both start in parallel so the interpreter start-up is paid once.
    """
    logs = tmp_path_factory.mktemp("echo-engines")
    fast = _spawn(
        logs / "fast.log", "--model", MODEL, "--api-key", API_KEY, "--token-delay-ms", "1"
    )
    slow = _spawn(
        logs / "slow.log",
        "--token-delay-ms",
        str(SLOW_TOKEN_DELAY_S * 1000),
        "--max-concurrency",
        "1",
    )
    try:
        for engine in (fast, slow):
            assert _first_answer(engine).status_code == 200
        yield fast, slow
    finally:
        _stop(fast)
        _stop(slow)


@pytest.fixture(scope="module")
def fast(engines: tuple[Engine, Engine]) -> Engine:
    return engines[0]


@pytest.fixture(scope="module")
def slow(engines: tuple[Engine, Engine]) -> Engine:
    return engines[1]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One pooled client: a fresh httpx client per call costs more than the engine's answer."""
    with httpx.Client(timeout=10) as shared:
        yield shared


def _client_for(engine: Engine) -> httpx.Client:
    return httpx.Client(
        base_url=engine.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    )


@pytest.fixture
def client(fast: Engine) -> Iterator[httpx.Client]:
    with _client_for(fast) as http:
        yield http


def _metrics(http: httpx.Client, engine: Engine) -> dict[str, float]:
    """Samples keyed by `name{labels}` exactly as exposed."""
    text = http.get(engine.url("/metrics")).text
    return {
        key: float(value)
        for key, value in re.findall(r"^(vllm:[^\s{]+\{[^}]*\}) (\S+)$", text, re.MULTILINE)
    }


def _sample(
    http: httpx.Client,
    engine: Engine,
    metric: str,
    finished_reason: str | None = None,
    *,
    model: str = "echo",
) -> float:
    labels = f'model_name="{model}",engine="0"'
    if finished_reason is not None:
        labels += f',finished_reason="{finished_reason}"'
    return _metrics(http, engine)[f"{metric}{{{labels}}}"]


def _sse_events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


# --- OpenAI surface --------------------------------------------------------------------------


def test_models_lists_the_served_model(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [MODEL]
    card = body["data"][0]
    assert card["object"] == "model"
    assert card["owned_by"] == "inventiv"
    assert isinstance(card["created"], int)


def test_chat_echoes_the_last_user_message_with_usage(client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "hello   there\n world"}]},
    ]
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "hello there world"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def test_chat_max_tokens_truncates_with_length(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=_chat("one two three four", max_tokens=2))
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "one two"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_chat_stream_arrives_token_by_token(http: httpx.Client, slow: Engine) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    arrivals: list[tuple[float, str]] = []
    started = time.monotonic()
    with http.stream(
        "POST", slow.url("/v1/chat/completions"), json=_chat(" ".join(words), stream=True)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in _sse_events(response.iter_lines()):
            arrivals.append((time.monotonic() - started, event))

    assert arrivals[-1][1] == "[DONE]"
    chunks = [json.loads(event) for _, event in arrivals[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    content_times = [
        at
        for (at, _), chunk in zip(arrivals, chunks, strict=False)
        if chunk["choices"][0]["delta"].get("content")
    ]
    pieces = [chunk["choices"][0]["delta"].get("content", "") for chunk in chunks]
    assert "".join(pieces) == " ".join(words)
    assert len(content_times) == len(words)  # one event per token, not one blob at the end
    # Six tokens at 50 ms: the first arrives well before the last (a buffered reply would not).
    assert content_times[-1] - content_times[0] >= (len(words) - 2) * SLOW_TOKEN_DELAY_S


def test_chat_stream_usage_chunk_when_asked(client: httpx.Client) -> None:
    payload = _chat("a b c", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        events = list(_sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_completions_echo_each_prompt(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": ["say  this", "x"]})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "say this", "stop"),
        (1, "x", "stop"),
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_completions_stream(client: httpx.Client) -> None:
    payload = {"prompt": "one two three", "stream": True, "max_tokens": 2}
    with client.stream("POST", "/v1/completions", json=payload) as response:
        events = list(_sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert [chunk["choices"][0]["text"] for chunk in chunks] == ["one", " two", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_embeddings_are_deterministic_unit_vectors(client: httpx.Client) -> None:
    def vectors(data: Any, **extra: Any) -> list[Any]:
        response = client.post("/v1/embeddings", json={"input": data, **extra})
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "list"
        assert body["model"] == MODEL
        assert [item["object"] for item in body["data"]] == ["embedding"] * len(body["data"])
        assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
        return [item["embedding"] for item in body["data"]]

    first, other = vectors(["hello world", "something else"])
    assert vectors("hello world") == [first]  # same text, same vector, across requests
    assert first != other
    assert len(first) == 16
    assert math.isclose(math.sqrt(sum(v * v for v in first)), 1.0, rel_tol=1e-9)
    # The official OpenAI client asks for base64 float32 by default.
    [encoded] = vectors("hello world", encoding_format="base64")
    decoded = struct.unpack("<16f", base64.b64decode(encoded))
    assert all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(decoded, first, strict=True)
    )


# --- auth, errors ----------------------------------------------------------------------------


def test_api_key_guards_v1_but_not_health_or_metrics(http: httpx.Client, fast: Engine) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = http.post(fast.url("/v1/chat/completions"), json=_chat("hi"), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get(fast.url("/v1/models"), headers=headers).status_code == 401
    assert http.get(fast.url("/health")).status_code == 200
    assert http.get(fast.url("/metrics")).status_code == 200


@pytest.mark.parametrize(
    ("path", "content", "status", "names"),
    [
        ("/v1/chat/completions", b"{not json", 400, "JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "object"),
        ("/v1/chat/completions", b'{"model": "echo-test"}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 400, "role"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "max_tokens": 0}', 400, "max"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "stream": "y"}', 400, "stream"),
        ("/v1/chat/completions", b'{"model": "gpt-4", "messages": []}', 404, "gpt-4"),
        ("/v1/completions", b'{"prompt": 42}', 400, "prompt"),
        ("/v1/completions", b"{}", 400, "prompt"),
        ("/v1/embeddings", b'{"input": []}', 400, "input"),
        ("/v1/embeddings", b'{"input": "x", "encoding_format": "hex"}', 400, "encoding_format"),
        ("/v1/nothing-here", b"{}", 404, "/v1/nothing-here"),
    ],
)
def test_errors_use_the_openai_shape(
    client: httpx.Client, path: str, content: bytes, status: int, names: str
) -> None:
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert names in error["message"]
    assert isinstance(error["type"], str)
    assert "code" in error


# --- engine state: startup, metrics ----------------------------------------------------------


def test_startup_delay_answers_503_then_200(http: httpx.Client, tmp_path: Path) -> None:
    engine = _spawn(tmp_path / "loading.log", "--startup-delay-s", "0.8")
    try:
        assert _first_answer(engine).status_code == 503
        assert http.get(engine.url("/v1/models")).json()["data"] == []
        chat = http.post(engine.url("/v1/chat/completions"), json=_chat("hi"))
        assert chat.status_code == 503
        assert chat.json()["error"]["code"] == "model_loading"
        deadline = time.monotonic() + 5
        while http.get(engine.url("/health")).status_code != 200:
            assert time.monotonic() < deadline, "still loading long after --startup-delay-s"
            time.sleep(0.05)
        models = http.get(engine.url("/v1/models")).json()["data"]
        assert [card["id"] for card in models] == ["echo"]
    finally:
        _stop(engine)


def test_metrics_follow_a_stream_in_flight(http: httpx.Client, slow: Engine) -> None:
    text = http.get(slow.url("/metrics")).text
    for name, kind in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:generation_tokens_total", "counter"),
        ("vllm:request_success_total", "counter"),
    ]:
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} {kind}" in text
    assert _sample(http, slow, "vllm:num_requests_running") == 0
    generated_before = _sample(http, slow, "vllm:generation_tokens_total")
    prompt_before = _sample(http, slow, "vllm:prompt_tokens_total")
    success_before = _sample(http, slow, "vllm:request_success_total", "stop")

    with (
        httpx.Client(timeout=10) as streaming,
        streaming.stream(
            "POST", slow.url("/v1/chat/completions"), json=_chat("t " * 8, stream=True)
        ) as response,
    ):
        events = _sse_events(response.iter_lines())
        next(events)  # role chunk
        next(events)  # first token
        assert _sample(http, slow, "vllm:num_requests_running") == 1
        assert _sample(http, slow, "vllm:num_requests_waiting") == 0
        assert _sample(http, slow, "vllm:prompt_tokens_total") == prompt_before + 8
        assert _sample(http, slow, "vllm:generation_tokens_total") >= generated_before + 1
        assert list(events)[-1] == "[DONE]"

    assert _sample(http, slow, "vllm:num_requests_running") == 0
    assert _sample(http, slow, "vllm:generation_tokens_total") == generated_before + 8
    assert _sample(http, slow, "vllm:request_success_total", "stop") == success_before + 1


def test_queued_requests_count_as_waiting_and_disconnects_free_the_slot(
    http: httpx.Client, slow: Engine
) -> None:
    aborted_before = _sample(http, slow, "vllm:request_success_total", "abort")
    queued: list[httpx.Response] = []
    with (
        httpx.Client(timeout=10) as streaming,
        streaming.stream(
            "POST", slow.url("/v1/chat/completions"), json=_chat("t " * 40, stream=True)
        ) as response,
    ):
        # Keep the iterator referenced: dropping it would close the stream before the point.
        events = _sse_events(response.iter_lines())
        next(events)
        second = threading.Thread(
            target=lambda: queued.append(
                httpx.post(slow.url("/v1/chat/completions"), json=_chat("queued ok"), timeout=10)
            )
        )
        second.start()
        deadline = time.monotonic() + 2
        while _sample(http, slow, "vllm:num_requests_waiting") != 1:
            assert time.monotonic() < deadline, "second request never showed up as waiting"
            time.sleep(0.01)
        assert _sample(http, slow, "vllm:num_requests_running") == 1
    # Leaving the stream after a few of its 40 tokens must free the slot for the queued request.
    second.join(timeout=5)
    assert queued and queued[0].json()["choices"][0]["message"]["content"] == "queued ok"
    assert _sample(http, slow, "vllm:request_success_total", "abort") == aborted_before + 1
    assert _sample(http, slow, "vllm:num_requests_running") == 0
    assert _sample(http, slow, "vllm:num_requests_waiting") == 0


def test_leaving_a_stream_aborts_it_and_frees_the_slot(http: httpx.Client, fast: Engine) -> None:
    aborted_before = _sample(http, fast, "vllm:request_success_total", "abort", model=MODEL)
    payload = _chat("t " * 2000, stream=True)  # 2000 tokens at 1 ms: far longer than this test
    with (
        _client_for(fast) as streaming,
        streaming.stream("POST", "/v1/chat/completions", json=payload) as response,
    ):
        events = _sse_events(response.iter_lines())
        next(events)
        next(events)
        assert _sample(http, fast, "vllm:num_requests_running", model=MODEL) == 1
    deadline = time.monotonic() + 2
    while _sample(http, fast, "vllm:num_requests_running", model=MODEL) != 0:
        assert time.monotonic() < deadline, "an abandoned stream still counts as running"
        time.sleep(0.01)
    assert _sample(http, fast, "vllm:request_success_total", "abort", model=MODEL) == (
        aborted_before + 1
    )
    generated = _sample(http, fast, "vllm:generation_tokens_total", model=MODEL)
    time.sleep(0.05)
    assert _sample(http, fast, "vllm:generation_tokens_total", model=MODEL) == generated


@pytest.mark.skipif(
    importlib.util.find_spec("inventiv.cli") is None, reason="main CLI not present yet"
)
def test_main_cli_runs_engine_echo(http: httpx.Client, tmp_path: Path) -> None:
    engine = _spawn(
        tmp_path / "cli.log", "--model", "via-cli", entry=("inventiv.cli", "engine", "echo")
    )
    try:
        assert _first_answer(engine).status_code == 200
        models = http.get(engine.url("/v1/models")).json()["data"]
        assert [card["id"] for card in models] == ["via-cli"]
    finally:
        _stop(engine)
