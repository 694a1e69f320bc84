"""The echo engine: an honest stand-in for vLLM on machines without a GPU.

Local workers and tests run this instead of `vllm serve`, so everything it shows to the rest of
Inventiv has to look like vLLM on the wire: the OpenAI-compatible routes, Server-Sent Events that
really arrive token by token, OpenAI error bodies, `/health` that answers 503 while the "model"
loads, and `/metrics` with vLLM's metric names whose values are the engine's real in-flight state.
What it generates is no secret: the last user message (or the prompt), split on whitespace, one
whitespace token per "generated token". Sampling parameters (temperature, top_p, stop, seed...) are
accepted and ignored, because an echo has nothing to sample.

Why a raw ASGI callable rather than Starlette or FastAPI:
- latency: a request goes from uvicorn's parser to our handler with one dict lookup, no middleware
  stack, no request/response objects, no validation models; the engine adds microseconds on top
  of the simulated token delay, so benchmarks of the router measure the router;
- streaming control: each SSE event is one `send()` written to the socket when the token is
  produced, and a client disconnect is noticed by our own `receive()` watcher, which is what lets
  `vllm:num_requests_running` drop back the moment a client goes away;
- error shape: every failure is built here in the OpenAI format, so no framework default
  (a 422 with `detail`, an HTML 500, a traceback) can leak out to an OpenAI client.

Build the ASGI app with `create_app(EchoConfig(...))`; serve it with `run(config, host, port)`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Literal

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
DEFAULT_MODEL: Final = "echo"
DEFAULT_TOKEN_DELAY_MS: Final = 5.0
DEFAULT_EMBEDDING_DIM: Final = 16
MAX_EMBEDDING_DIM: Final = 4096
OWNED_BY: Final = "inventiv"
# Prompts are echoed, so a huge body only costs memory; this bounds it like a real context window.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
# vLLM labels every engine metric with the served model name and the engine index.
ENGINE_INDEX: Final = "0"
FINISH_REASONS: Final = ("stop", "length", "abort")

FinishReason = Literal["stop", "length", "abort"]

_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Tells nginx-like proxies in front of a worker not to buffer the stream.
    (b"x-accel-buffering", b"no"),
]
_METRICS_HEADERS: Final = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
_DONE_EVENT: Final = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class EchoConfig:
    """Everything that makes one echo engine differ from another, fixed at start like vLLM's."""

    model: str = DEFAULT_MODEL
    api_key: str | None = None
    token_delay_ms: float = DEFAULT_TOKEN_DELAY_MS
    startup_delay_s: float = 0.0
    # 0 means unlimited; otherwise requests beyond it queue and show up as waiting in /metrics.
    max_concurrency: int = 0
    embedding_dim: int = DEFAULT_EMBEDDING_DIM

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a non-empty string")
        if self.token_delay_ms < 0 or not math.isfinite(self.token_delay_ms):
            raise ValueError("token_delay_ms must be a finite number >= 0")
        if self.startup_delay_s < 0 or not math.isfinite(self.startup_delay_s):
            raise ValueError("startup_delay_s must be a finite number >= 0")
        if self.max_concurrency < 0:
            raise ValueError("max_concurrency must be >= 0 (0 means unlimited)")
        if not 1 <= self.embedding_dim <= MAX_EMBEDDING_DIM:
            raise ValueError(f"embedding_dim must be between 1 and {MAX_EMBEDDING_DIM}")


class ApiError(Exception):
    """A failure that becomes an OpenAI error body, the only error format OpenAI clients parse."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Disconnected(Exception):
    """The client went away; generation stops and the request counts as aborted."""


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", code="invalid_value", param=param)


@dataclass(frozen=True, slots=True)
class _Generation:
    """A validated generation request: what to emit per choice and why each choice ends."""

    kind: Literal["chat", "completion"]
    choices: tuple[tuple[str, ...], ...]
    finish_reasons: tuple[FinishReason, ...]
    prompt_tokens: int
    stream: bool
    include_usage: bool

    @property
    def completion_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.choices)


# ---------------------------------------------------------------------------------------------
# Request validation: each helper names the offending field, so a 400 tells the caller what to fix.
# ---------------------------------------------------------------------------------------------


def _optional_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(name, "must be a boolean")
    return value


def _max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(name, "must be an integer")
        if value < 1:
            raise _invalid(name, "must be at least 1")
        return value
    return None


def _check_n(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise _invalid("n", "must be an integer")
    if n != 1:
        raise _invalid("n", "the echo engine produces exactly one choice per prompt (n=1)")


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _invalid("stream_options", "must be an object")
    if not stream:
        raise _invalid("stream_options", "is only allowed when stream is true")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _invalid("stream_options.include_usage", "must be a boolean")
    return bool(include_usage)


def _truncate(tokens: list[str], max_tokens: int | None) -> tuple[tuple[str, ...], FinishReason]:
    if max_tokens is not None and len(tokens) > max_tokens:
        return tuple(tokens[:max_tokens]), "length"
    return tuple(tokens), "stop"


def _message_text(message: dict[str, Any], index: int) -> str:
    """The text of a message, whether `content` is a string, null, or a list of content parts."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _invalid(f"messages[{index}].content", "must be a string, a list of parts, or null")
    texts: list[str] = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _invalid(where, "must be an object with a string 'type'")
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{where}.text", "must be a string")
            texts.append(text)
    return " ".join(texts)


def parse_chat(body: dict[str, Any]) -> _Generation:
    """Validate a /v1/chat/completions body and decide what the echo will say."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages: field required", code="missing_field", param="messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of message objects")
    prompt_tokens = 0
    echoed = ""
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{index}]", "must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _invalid(f"messages[{index}].role", "must be a non-empty string")
        text = _message_text(message, index)
        prompt_tokens += len(text.split())
        if role == "user":
            echoed = text
    stream = _optional_bool(body, "stream")
    _check_n(body)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    tokens, reason = _truncate(echoed.split(), max_tokens)
    return _Generation(
        kind="chat",
        choices=(tokens,),
        finish_reasons=(reason,),
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def _texts_of_input(value: Any, name: str) -> list[str]:
    """Normalise an OpenAI prompt/input (string, strings, token ids, lists of token ids) to texts.

    Token ids have no text in an engine without a tokenizer, so they are echoed as their numbers.
    """
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise _invalid(name, "must be a string or a non-empty list of strings or token ids")
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [" ".join(str(item) for item in value)]
    texts: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, str | int):
            raise _invalid(name, "must not mix strings, token ids and lists of token ids")
        if not isinstance(item, list) or not item:
            raise _invalid(f"{name}[{index}]", "must be a string or a non-empty list of token ids")
        if not all(isinstance(tok, int) and not isinstance(tok, bool) for tok in item):
            raise _invalid(f"{name}[{index}]", "token ids must be integers")
        texts.append(" ".join(str(tok) for tok in item))
    return texts


def parse_completion(body: dict[str, Any]) -> _Generation:
    """Validate a /v1/completions body; several prompts give one choice each, as in vLLM."""
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "prompt: field required", code="missing_field", param="prompt")
    prompts = _texts_of_input(body["prompt"], "prompt")
    stream = _optional_bool(body, "stream")
    _check_n(body)
    max_tokens = _max_tokens(body, ("max_tokens",))
    choices: list[tuple[str, ...]] = []
    reasons: list[FinishReason] = []
    prompt_tokens = 0
    for prompt in prompts:
        words = prompt.split()
        prompt_tokens += len(words)
        tokens, reason = _truncate(words, max_tokens)
        choices.append(tokens)
        reasons.append(reason)
    return _Generation(
        kind="completion",
        choices=tuple(choices),
        finish_reasons=tuple(reasons),
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def embed(text: str, dim: int = DEFAULT_EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for `text`: same text, same vector, on every machine and run.

    SHAKE-256 gives as many well-spread bytes as the dimension needs, so the vector depends on the
    whole text and nothing else (no process-salted `hash()`).
    """
    raw = hashlib.shake_256(text.encode("utf-8")).digest(4 * dim)
    values = [(word / 0xFFFFFFFF) * 2.0 - 1.0 for (word,) in struct.iter_unpack("<I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


# ---------------------------------------------------------------------------------------------
# Engine state and the Prometheus exposition built from it.
# ---------------------------------------------------------------------------------------------


class EngineState:
    """The live counters behind /metrics, mutated only from the event loop (so no locks)."""

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.request_success: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self.created = int(time.time())
        self.loaded_at = time.monotonic() + config.startup_delay_s
        self._slots: asyncio.Semaphore | None = None

    def restart_loading_clock(self) -> None:
        """Count the startup delay from when the server starts, not from when the app was built."""
        self.loaded_at = time.monotonic() + self.config.startup_delay_s

    def is_loaded(self) -> bool:
        return time.monotonic() >= self.loaded_at

    async def admit(self, disconnected: asyncio.Event) -> bool:
        """Take a running slot, queueing as `waiting` when --max-concurrency is reached.

        Returns False if the client left while queued, so it never occupies a slot.
        """
        if self.config.max_concurrency and not await self._acquire_slot(disconnected):
            return False
        self.running += 1
        return True

    async def _acquire_slot(self, disconnected: asyncio.Event) -> bool:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrency)
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        self.waiting += 1
        acquire = asyncio.ensure_future(self._slots.acquire())
        gone = asyncio.ensure_future(disconnected.wait())
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting -= 1
            gone.cancel()
        if acquire.done() and not acquire.cancelled():
            if not disconnected.is_set():
                return True
            self._slots.release()
            return False
        acquire.cancel()
        return False

    def release(self) -> None:
        self.running -= 1
        if self._slots is not None:
            self._slots.release()

    def render_metrics(self) -> bytes:
        """Prometheus text format with vLLM's names, HELP texts and `model_name`/`engine` labels."""
        model = _label_value(self.config.model)
        labels = f'model_name="{model}",engine="{ENGINE_INDEX}"'
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(
                f"{name}{{{sample_labels}}} {float(value)!r}" for sample_labels, value in samples
            )

        family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [(labels, self.running)],
        )
        family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(labels, self.waiting)],
        )
        family(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            [(labels, self.prompt_tokens_total)],
        )
        family(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [(labels, self.generation_tokens_total)],
        )
        family(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [
                (f'{labels},finished_reason="{reason}"', count)
                for reason, count in self.request_success.items()
            ],
        )
        return ("\n".join(lines) + "\n").encode("utf-8")


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------------------------------------
# The ASGI application.
# ---------------------------------------------------------------------------------------------


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sse(payload: Any) -> bytes:
    return b"data: " + _dumps(payload) + b"\n\n"


class EchoEngine:
    """The ASGI app. One instance is one engine: one model, one set of counters."""

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.state = EngineState(config)
        self._token_delay_s = config.token_delay_ms / 1000.0
        self._api_key = config.api_key.encode("utf-8") if config.api_key else None
        self._routes: dict[str, tuple[str, Callable[[Scope, Receive, Send], Awaitable[None]]]] = {
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
            "/v1/models": ("GET", self._models),
            "/v1/chat/completions": ("POST", self._chat_completions),
            "/v1/completions": ("POST", self._completions),
            "/v1/embeddings": ("POST", self._embeddings),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        # Websockets are not part of the OpenAI API; closing without accepting rejects them.
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.state.restart_loading_clock()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        # Once a response has started (a stream), an error can only end it, not replace it.
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if path.startswith("/v1/"):
                self._authorize(scope)
            route = self._routes.get(path)
            if route is None:
                if path.startswith("/v1/models/"):
                    route = ("GET", self._model)
                else:
                    raise ApiError(404, f"No route for {path}", code="not_found")
            method, handler = route
            if scope["method"] != method:
                raise ApiError(
                    405,
                    f"Method {scope['method']} not allowed on {path}",
                    code="method_not_allowed",
                    headers=[(b"allow", method.encode("ascii"))],
                )
            await handler(scope, receive, tracked_send)
        except ApiError as error:
            if not started:
                await _send_json(send, error.status, error.body(), error.headers)
        except (_Disconnected, OSError):
            return  # Nobody is left to answer.
        except Exception:  # The last line of defence: a bug must still answer in OpenAI form.
            logger.exception("echo engine: unexpected error on %s", path)
            if not started:
                error = ApiError(500, "internal error in the echo engine", type_="server_error")
                await _send_json(send, 500, error.body())

    def _authorize(self, scope: Scope) -> None:
        if self._api_key is None:
            return
        supplied = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = token.strip()
                break
        if not hmac.compare_digest(supplied, self._api_key):
            raise ApiError(
                401,
                "Missing or incorrect API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    def _require_loaded(self) -> None:
        if not self.state.is_loaded():
            raise ApiError(
                503,
                f"The model `{self.config.model}` is still loading.",
                type_="server_error",
                code="model_loading",
            )

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is None:
            return
        if not isinstance(model, str):
            raise _invalid("model", "must be a string")
        if model != self.config.model:
            raise ApiError(
                404,
                f"The model `{model}` does not exist.",
                code="model_not_found",
                param="model",
            )

    # --- plain routes ------------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.state.is_loaded():
            await _send_bytes(send, 200, b"", [])
        else:
            await _send_bytes(send, 503, b"loading\n", [(b"content-type", b"text/plain")])

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_bytes(send, 200, self.state.render_metrics(), _METRICS_HEADERS)

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model,
            "object": "model",
            "created": self.state.created,
            "owned_by": OWNED_BY,
        }

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        data = [self._model_card()] if self.state.is_loaded() else []
        await _send_json(send, 200, {"object": "list", "data": data})

    async def _model(self, scope: Scope, receive: Receive, send: Send) -> None:
        model_id = scope["path"][len("/v1/models/") :].rstrip("/")
        if model_id != self.config.model or not self.state.is_loaded():
            raise ApiError(
                404,
                f"The model `{model_id}` does not exist.",
                code="model_not_found",
                param="model",
            )
        await _send_json(send, 200, self._model_card())

    # --- generation --------------------------------------------------------------------------

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_json(receive)
        self._require_loaded()
        self._check_model(body)
        await self._generate(parse_chat(body), receive, send)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_json(receive)
        self._require_loaded()
        self._check_model(body)
        await self._generate(parse_completion(body), receive, send)

    async def _generate(self, job: _Generation, receive: Receive, send: Send) -> None:
        """Run one generation in a running slot, whatever happens to the client on the way."""
        disconnected = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, disconnected))
        try:
            if not await self.state.admit(disconnected):
                return
            try:
                self.state.prompt_tokens_total += job.prompt_tokens
                if job.stream:
                    await self._stream(job, send, disconnected)
                else:
                    await self._complete(job, send, disconnected)
            except _Disconnected:
                pass
            finally:
                self.state.release()
        finally:
            watcher.cancel()

    def _pacer(self, disconnected: asyncio.Event) -> Callable[[int], Awaitable[None]]:
        """A pacer that waits until token i is "generated" on an absolute schedule (no drift)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        delay = self._token_delay_s

        async def wait_for_token(index: int) -> None:
            if delay > 0:
                remaining = start + (index + 1) * delay - loop.time()
                if remaining > 0:
                    await asyncio.sleep(remaining)
            if disconnected.is_set():
                raise _Disconnected
            self.state.generation_tokens_total += 1

        return wait_for_token

    def _finish(self, reason: FinishReason) -> None:
        self.state.request_success[reason] += 1

    def _usage(self, job: _Generation) -> dict[str, int]:
        completion = job.completion_tokens
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion,
        }

    async def _complete(self, job: _Generation, send: Send, disconnected: asyncio.Event) -> None:
        created = int(time.time())
        choices: list[dict[str, Any]] = []
        for index, (tokens, reason) in enumerate(zip(job.choices, job.finish_reasons, strict=True)):
            wait_for_token = self._pacer(disconnected)
            try:
                for position in range(len(tokens)):
                    await wait_for_token(position)
            except _Disconnected:
                self._finish("abort")
                raise
            self._finish(reason)
            text = " ".join(tokens)
            if job.kind == "chat":
                choice = {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            else:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            choices.append(choice)
        payload = {
            "id": _completion_id(job),
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": created,
            "model": self.config.model,
            "choices": choices,
            "usage": self._usage(job),
        }
        await _send_json(send, 200, payload)

    async def _stream(self, job: _Generation, send: Send, disconnected: asyncio.Event) -> None:
        chat = job.kind == "chat"
        base: dict[str, Any] = {
            "id": _completion_id(job),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.config.model,
        }
        if job.include_usage:
            base["usage"] = None

        async def emit(choice: dict[str, Any]) -> None:
            try:
                await send(
                    {
                        "type": "http.response.body",
                        "body": _sse({**base, "choices": [choice]}),
                        "more_body": True,
                    }
                )
            except (
                OSError
            ) as exc:  # ASGI servers that raise on a closed socket instead of dropping.
                disconnected.set()
                raise _Disconnected from exc

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        for index, (tokens, reason) in enumerate(zip(job.choices, job.finish_reasons, strict=True)):
            wait_for_token = self._pacer(disconnected)
            try:
                if chat:
                    # OpenAI and vLLM open the assistant turn with a role-only delta at once.
                    await emit(
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    )
                for position, token in enumerate(tokens):
                    await wait_for_token(position)
                    piece = token if position == 0 else " " + token
                    if chat:
                        choice = {
                            "index": index,
                            "delta": {"content": piece},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    else:
                        choice = {
                            "index": index,
                            "text": piece,
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    await emit(choice)
                if chat:
                    last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
                else:
                    last = {"index": index, "text": "", "logprobs": None, "finish_reason": reason}
                await emit(last)
            except _Disconnected:
                self._finish("abort")
                raise
            self._finish(reason)
        tail = b""
        if job.include_usage:
            tail = _sse({**base, "choices": [], "usage": self._usage(job)})
        await send({"type": "http.response.body", "body": tail + _DONE_EVENT, "more_body": False})

    # --- embeddings --------------------------------------------------------------------------

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_json(receive)
        self._require_loaded()
        self._check_model(body)
        if "input" not in body or body["input"] is None:
            raise ApiError(400, "input: field required", code="missing_field", param="input")
        texts = _texts_of_input(body["input"], "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _invalid("encoding_format", "must be 'float' or 'base64'")
        dim = body.get("dimensions")
        if dim is None:
            dim = self.config.embedding_dim
        elif isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_EMBEDDING_DIM:
            raise _invalid("dimensions", f"must be an integer between 1 and {MAX_EMBEDDING_DIM}")
        prompt_tokens = sum(len(text.split()) for text in texts)
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            vector = embed(text, dim)
            # The official OpenAI Python client asks for base64 (little-endian float32) by default.
            encoded: list[float] | str = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode("ascii")
                if encoding == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        self.state.prompt_tokens_total += prompt_tokens
        self.state.request_success["stop"] += len(texts)
        payload = {
            "object": "list",
            "data": data,
            "model": self.config.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        await _send_json(send, 200, payload)


def _completion_id(job: _Generation) -> str:
    prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
    return prefix + uuid.uuid4().hex


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


async def _read_json(receive: Receive) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"Request body is larger than {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "Request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
    return body


async def _send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode("ascii"))],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send_bytes(send, status, _dumps(payload), [*_JSON_HEADERS, *(headers or [])])


def create_app(config: EchoConfig | None = None) -> EchoEngine:
    """Build the echo engine's ASGI app; embed it in tests or serve it with any ASGI server."""
    return EchoEngine(config or EchoConfig())


def run(
    config: EchoConfig,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_level: str = "info",
) -> None:
    """Serve the echo engine with uvicorn until interrupted (what `inventiv engine echo` does)."""
    # Imported here so that every `inventiv ...` command, which loads this module through the CLI,
    # does not pay for uvicorn's import.
    import uvicorn

    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        # A client holding a stream open must not keep a stopping engine alive for ever.
        timeout_graceful_shutdown=5,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m inventiv.engines.echo [OPTIONS]`: the same options as `inventiv engine echo`."""
    import typer
    import typer.core

    # Imported here because the CLI module imports this one to build its command.
    from inventiv.engines.cli import engine_app

    group = typer.main.get_command(engine_app)
    assert isinstance(group, typer.core.TyperGroup)  # its callback keeps engine_app a group
    group.commands["echo"].main(
        args=sys.argv[1:] if argv is None else argv, prog_name="python -m inventiv.engines.echo"
    )


if __name__ == "__main__":
    main()
