"""The agent's health server: liveness, readiness, metrics and the signed /control/url."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from inventiv.agent.health import HealthApp, HealthServer, render_metrics
from inventiv.agent.metrics import parse_prometheus
from inventiv.agent.state import AgentState
from inventiv.agent.urls import ControlPlaneUrl
from inventiv.protocol import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WorkerStatus,
    hash_token,
    sign_control_request,
)

WORKER_TOKEN = "ivt_work_test-token"


def _app(state: AgentState, urls: ControlPlaneUrl, token: str | None = WORKER_TOKEN) -> HealthApp:
    return HealthApp(
        state,
        token_hash=lambda: hash_token(token) if token else None,
        adopt_url=lambda raw: urls.adopt(raw, "POST /control/url"),
    )


def _client(app: HealthApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent")


def _signed(body: bytes, token: str = WORKER_TOKEN, ts: float | None = None) -> dict[str, str]:
    stamp = f"{time.time() if ts is None else ts:.3f}"
    return {
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign_control_request(hash_token(token), stamp, body),
        "content-type": "application/json",
    }


def _read(path: Path) -> str:
    return path.read_text().strip()


@pytest.fixture
def url_file(tmp_path: Path) -> Path:
    path = tmp_path / "control-plane-url"
    path.write_text("https://old.trycloudflare.com\n")
    return path


async def test_healthz_and_readyz_follow_state(url_file: Path) -> None:
    state = AgentState()
    urls = ControlPlaneUrl(None, url_file)
    urls.load()
    async with _client(_app(state, urls)) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        state.registered = True
        state.engine_ready = True
        state.status = WorkerStatus.READY
        assert (await client.get("/readyz")).status_code == 200
        state.status = WorkerStatus.DRAINING  # draining: alive, but no new work
        assert (await client.get("/readyz")).status_code == 503
        missing = await client.get("/nope")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"


async def test_metrics_exposition(url_file: Path) -> None:
    state = AgentState(heartbeat_failures=3, engine_restarts=2, registered=True)
    state.last_heartbeat_ok_at = time.monotonic() - 5
    urls = ControlPlaneUrl(None, url_file)
    urls.load()
    async with _client(_app(state, urls)) as client:
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    values = parse_prometheus(response.text)
    assert values["inventiv_agent_up"] == 1
    assert values["inventiv_agent_heartbeat_failures_total"] == 3
    assert values["inventiv_agent_engine_restarts_total"] == 2
    assert 4.5 < values["inventiv_agent_last_heartbeat_age_seconds"] < 30
    assert values["inventiv_agent_registered"] == 1
    assert 'inventiv_agent_status{status="starting"} 1' in response.text


def test_metrics_omit_heartbeat_age_before_first_heartbeat() -> None:
    assert "last_heartbeat_age" not in render_metrics(AgentState())


async def test_control_url_signed_update_adopted_and_written(url_file: Path) -> None:
    urls = ControlPlaneUrl(None, url_file)
    urls.load()
    body = json.dumps({"control_plane_url": "https://new.trycloudflare.com"}).encode()
    async with _client(_app(AgentState(), urls)) as client:
        response = await client.post("/control/url", content=body, headers=_signed(body))
    assert response.status_code == 200, response.text
    assert response.json()["changed"] is True
    assert urls.current == "https://new.trycloudflare.com"
    assert _read(url_file) == "https://new.trycloudflare.com"


@pytest.mark.parametrize(
    "case", ["wrong_token", "tampered_body", "stale_timestamp", "missing", "not_registered"]
)
async def test_control_url_refuses_bad_signatures(url_file: Path, case: str) -> None:
    urls = ControlPlaneUrl(None, url_file)
    urls.load()
    body = json.dumps({"control_plane_url": "https://evil.trycloudflare.com"}).encode()
    headers = _signed(body)
    token: str | None = WORKER_TOKEN
    if case == "wrong_token":
        headers = _signed(body, token="ivt_work_other")
    elif case == "tampered_body":
        body = body.replace(b"evil", b"evil2")
    elif case == "stale_timestamp":
        headers = _signed(body, ts=time.time() - 3600)
    elif case == "missing":
        headers = {"content-type": "application/json"}
    else:
        token = None  # no worker token yet: nothing can be verified
    async with _client(_app(AgentState(), urls, token)) as client:
        response = await client.post("/control/url", content=body, headers=headers)
    assert response.status_code == 401
    assert set(response.json()) == {"error", "message"}
    assert response.json()["error"] in ("invalid_signature", "missing_signature")
    assert urls.current == "https://old.trycloudflare.com"
    assert _read(url_file) == "https://old.trycloudflare.com"


async def test_control_url_invalid_url_is_422_naming_the_rule(url_file: Path) -> None:
    urls = ControlPlaneUrl(None, url_file)
    urls.load()
    async with _client(_app(AgentState(), urls)) as client:
        body = json.dumps({"control_plane_url": "https://x.trycloudflare.com/"}).encode()
        response = await client.post("/control/url", content=body, headers=_signed(body))
        assert response.status_code == 422
        assert response.json()["error"] == "invalid_url"
        assert "no_trailing_slash" in response.json()["message"]
        body = json.dumps({"url": "https://x.trycloudflare.com"}).encode()
        response = await client.post("/control/url", content=body, headers=_signed(body))
        assert response.status_code == 422 and response.json()["error"] == "invalid_field"
        big = b"{" + b" " * 70_000 + b"}"
        response = await client.post("/control/url", content=big, headers=_signed(big))
        assert response.status_code == 413
    assert urls.current == "https://old.trycloudflare.com"


async def test_health_server_binds_free_port_and_serves(url_file: Path) -> None:
    urls = ControlPlaneUrl(None, url_file)
    urls.load()
    server = HealthServer(_app(AgentState(), urls), "127.0.0.1", 0)
    port = server.bind()
    assert port > 0
    task = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(50):
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/healthz")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.02)
            assert response.json() == {"status": "ok"}
    finally:
        server.stop()
        await asyncio.wait_for(task, 5)
