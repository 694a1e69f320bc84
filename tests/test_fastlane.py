"""FastLane, the HTTP/1.1 front of both services, seen from raw sockets on the API's port.

It answers the worker and admin forwarding itself and hands any other connection to uvicorn;
these tests pin down the HTTP behaviour that a general-purpose server would otherwise give for
free: keep-alive with mixed routes, pipelining, early refusals, malformed input, shutdown.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import time
from dataclasses import dataclass, field

import httptools
import pytest

from tests.conftest import Stack, StackFactory

PING = b"GET /internal/worker/ping HTTP/1.1\r\nhost: t\r\nx-request-id: %s\r\n\r\n"
ROOT = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> dict:
        return json.loads(self.body)


class Reader:
    """Reads HTTP/1.1 answers off a socket, in order, however they are split or joined."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done: list[Answer] = []
        self._current = Answer()
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_message_complete(self) -> None:
        self.done.append(self._current)
        self._current = Answer()

    def answers(self, count: int, timeout: float = 10.0) -> list[Answer]:
        self.sock.settimeout(timeout)
        while len(self.done) < count:
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                break
            self._parser.feed_data(data)
        taken, self.done = self.done[:count], self.done[count:]
        return taken

    def at_eof(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False


def connect(stack: Stack) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", stack.api_port), timeout=10)
    return sock, Reader(sock)


def test_one_connection_serves_fast_routes_then_fastapi_routes(module_stack: Stack) -> None:
    """A heartbeat-style call, then the FastAPI root, then a worker call again: one socket."""
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(PING % b"first")
        (first,) = reader.answers(1)
        sock.sendall(ROOT)
        (root,) = reader.answers(1)
        sock.sendall(PING % b"third")
        (third,) = reader.answers(1)
    assert first.status == 200 and first.json()["service"] == "inventiv-orchestrator"
    assert first.headers["x-request-id"] == "first"
    assert root.status == 200 and root.json()["service"] == "inventiv-api"
    assert third.status == 200 and third.headers["x-request-id"] == "third"
    assert "date" in first.headers and "date" in root.headers


def test_pipelined_requests_are_answered_in_order(module_stack: Stack) -> None:
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(b"".join(PING % name for name in (b"a", b"b", b"c", b"d")))
        answers = reader.answers(4)
    assert [a.headers["x-request-id"] for a in answers] == ["a", "b", "c", "d"]
    assert all(a.status == 200 for a in answers)


def test_other_route_pipelined_behind_fast_ones_closes_after_them(module_stack: Stack) -> None:
    """Where it starts in the stream is unknown, so it is not guessed: the client retries."""
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(PING % b"a" + ROOT)
        (first,) = reader.answers(1)
        assert first.status == 200 and first.headers["connection"] == "close"
        assert reader.at_eof()
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(ROOT)
        (root,) = reader.answers(1)
    assert root.status == 200


def test_a_request_split_across_reads_is_handed_over_whole(module_stack: Stack) -> None:
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(b"GET / HTT")
        time.sleep(0.1)
        sock.sendall(b"P/1.1\r\nhost: t\r\n")
        time.sleep(0.1)
        sock.sendall(b"\r\n")
        (root,) = reader.answers(1)
    assert root.status == 200 and root.json()["service"] == "inventiv-api"


def test_oversized_body_is_refused_before_it_is_sent(module_stack: Stack) -> None:
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(
            b"POST /internal/worker/heartbeat HTTP/1.1\r\nhost: t\r\n"
            b"content-type: application/json\r\ncontent-length: 10000000\r\n\r\n"
        )
        (answer,) = reader.answers(1)
        assert reader.at_eof()
    assert answer.status == 413
    assert answer.json()["error"] == "body_too_large"


def test_oversized_chunked_body_is_refused_midway(module_stack: Stack) -> None:
    sock, reader = connect(module_stack)
    chunk = b"x" * 16384
    with sock:
        sock.sendall(
            b"POST /internal/worker/heartbeat HTTP/1.1\r\nhost: t\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(8):  # 128 KiB, twice the limit
                sock.sendall(b"4000\r\n" + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while still sending: what the test expects
        (answer,) = reader.answers(1)
    assert answer.status == 413


def test_expect_continue_gets_an_interim_answer(module_stack: Stack) -> None:
    body = b'{"instance_id":"test","worker_id":"test"}'
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(
            b"POST /internal/worker/register HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        sock.settimeout(5)
        interim = sock.recv(100)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        reader._parser.feed_data(interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
        sock.sendall(body)
        (answer,) = reader.answers(1)
    assert answer.status == 401 and answer.json()["error"] == "missing_token"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid_http"),
        (
            b"POST /internal/worker/heartbeat HTTP/1.1\r\nhost: t\r\n"
            b"x-big: " + b"a" * 70000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"POST /internal/worker/heartbeat HTTP/1.1\r\nhost: t\r\ncontent-length: ten\r\n\r\n",
            400,
            None,
        ),
    ],
    ids=["garbage", "huge-headers", "bad-length"],
)
def test_malformed_requests_get_the_standard_error_body(
    module_stack: Stack, raw: bytes, status: int, code: str | None
) -> None:
    sock, reader = connect(module_stack)
    with sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        (answer,) = reader.answers(1)
    assert answer.status == status
    body = answer.json()
    assert set(body) == {"error", "message"}
    if code is not None:
        assert body["error"] == code


def test_http10_client_gets_its_answer_then_the_close(module_stack: Stack) -> None:
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(b"GET /internal/worker/ping HTTP/1.0\r\n\r\n")
        (answer,) = reader.answers(1)
        assert reader.at_eof()
    assert answer.status == 200 and answer.headers["connection"] == "close"


def test_shutdown_does_not_wait_for_idle_keep_alive_connections(
    stack_factory: StackFactory,
) -> None:
    """uvicorn waits for every connection to close; an idle FastLane one must close at once."""
    stack = stack_factory()
    sock, reader = connect(stack)
    with sock:
        sock.sendall(PING % b"idle")
        (answer,) = reader.answers(1)
        assert answer.status == 200
        proc = stack.procs["api"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - started < 5
        assert reader.at_eof()


@pytest.mark.parametrize(
    ("request_line", "status", "code"),
    [
        (b"GET /internal/worker/nope HTTP/1.1", 404, "not_found"),
        (b"GET /internal/worker/heartbeat HTTP/1.1", 405, "method_not_allowed"),
    ],
)
def test_unknown_worker_routes_get_the_standard_error_and_keep_the_connection(
    module_stack: Stack, request_line: bytes, status: int, code: str
) -> None:
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(request_line + b"\r\nhost: t\r\n\r\n")
        (answer,) = reader.answers(1)
        sock.sendall(PING % b"after")
        (after,) = reader.answers(1)
    assert answer.status == status and answer.json()["error"] == code
    assert "docs/worker-protocol.md" in answer.json()["message"]
    assert after.status == 200


def test_a_long_pipeline_is_answered_whole(module_stack: Stack) -> None:
    """More requests than FastLane parses ahead: it stops reading, catches up, reads on."""
    names = [b"r%d" % i for i in range(2000)]  # about 150 KB: many reads
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(b"".join(PING % name for name in names))
        answers = reader.answers(len(names))
    assert [a.headers["x-request-id"].encode() for a in answers] == names


def test_pipelined_requests_split_at_random_points_are_all_answered(module_stack: Stack) -> None:
    """Request boundaries fall anywhere in the reads; the parser state carries across them."""
    rng = random.Random(7)
    names = [b"s%d" % i for i in range(60)]
    stream = b"".join(PING % name for name in names)
    sock, reader = connect(module_stack)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        position = 0
        while position < len(stream):
            size = rng.randint(1, 300)
            sock.sendall(stream[position : position + size])
            position += size
            time.sleep(0.002)
        answers = reader.answers(len(names))
    assert [a.headers["x-request-id"].encode() for a in answers] == names


def test_a_handed_over_connection_still_refuses_oversized_bodies(module_stack: Stack) -> None:
    """After a FastAPI request the connection is uvicorn's; worker routes keep their limits."""
    sock, reader = connect(module_stack)
    with sock:
        sock.sendall(ROOT)
        (root,) = reader.answers(1)
        sock.sendall(
            b"POST /internal/worker/heartbeat HTTP/1.1\r\nhost: t\r\n"
            b"content-type: application/json\r\ncontent-length: 10000000\r\n\r\n"
        )
        (answer,) = reader.answers(1)
    assert root.status == 200
    assert answer.status == 413 and answer.json()["error"] == "body_too_large"


@pytest.fixture(scope="module")
def impatient(module_stack_factory: StackFactory) -> Stack:
    """A stack that gives each request one second to arrive."""
    return module_stack_factory(env={"INVENTIV_REQUEST_TIMEOUT_S": "1"})


def test_a_request_trickling_in_gets_408_then_the_close(impatient: Stack) -> None:
    sock, reader = connect(impatient)
    with sock:
        started = time.monotonic()
        sock.sendall(b"POST /internal/worker/heartbeat HTTP/1.1\r\nhost: t\r\n")
        (answer,) = reader.answers(1)
        waited = time.monotonic() - started
        assert reader.at_eof()
    assert answer.status == 408 and answer.json()["error"] == "request_timeout"
    assert 0.8 < waited < 5


def test_a_connection_that_never_sends_a_request_is_closed(impatient: Stack) -> None:
    sock, reader = connect(impatient)
    with sock:
        started = time.monotonic()
        assert reader.at_eof(timeout=10)
        assert 0.8 < time.monotonic() - started < 5


def test_the_deadline_is_per_request_not_per_connection(impatient: Stack) -> None:
    """The deadline is per request: a keep-alive connection used for longer is fine."""
    sock, reader = connect(impatient)
    with sock:
        for name in (b"one", b"two", b"three"):
            sock.sendall(PING % name)
            (answer,) = reader.answers(1)
            assert answer.status == 200
            time.sleep(0.6)


def read_head_answer(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """A HEAD answer: status and headers, read up to the blank line, and nothing after it."""
    sock.settimeout(15)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the answer's headers"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert rest == b"", f"a HEAD answer carried a body: {rest[:80]!r}"
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers


@pytest.mark.parametrize(
    "path", ["/api/instances", "/internal/worker/ping"], ids=["admin", "worker"]
)
def test_head_is_answered_like_get_without_the_body(module_stack: Stack, path: str) -> None:
    """Forwarded as GET (an upstream HEAD answer has no body to wait for), then trimmed."""
    sock, reader = connect(module_stack)
    with sock:
        started = time.monotonic()
        sock.sendall(
            b"HEAD %s HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %s\r\n\r\n"
            % (path.encode(), module_stack.admin_token.encode())
        )
        status, headers = read_head_answer(sock)
        assert time.monotonic() - started < 5
        sock.sendall(PING % b"after-head")
        (after,) = reader.answers(1)
    assert status == 200 and int(headers["content-length"]) > 0
    assert after.status == 200 and after.headers["x-request-id"] == "after-head"
