"""Named tunnels: the config publishes worker paths only, and its hostname becomes the URL."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from inventiv.config import Settings
from inventiv.tunnel.named import (
    NamedTunnelError,
    build_config,
    check_hostname,
    ingress_ports,
    public_url,
    render_config,
    resolve_credentials_file,
)
from tests.fake_cloudflared.helpers import (  # fake_api_fixture provides `api`
    CLI,
    FakeAPI,
    Running,
    fake_api_fixture,  # noqa: F401
    make_env,
    read_env_file,
    wait_for,
)


def test_config_publishes_worker_paths_only(tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    config = build_config("inventiv-dev", "cp.example.com", 18003, creds)
    assert config == {
        "tunnel": "inventiv-dev",
        "credentials-file": str(creds),
        "ingress": [
            {
                "hostname": "cp.example.com",
                "path": "^/internal/worker/",
                "service": "http://127.0.0.1:18003",
            },
            {"service": "http_status:404"},
        ],
    }
    assert yaml.safe_load(render_config(config)) == config
    assert ingress_ports(config) == [18003]


def test_publish_gateway_adds_v1_before_the_catch_all(tmp_path: Path) -> None:
    config = build_config("t", "cp.example.com", 8003, tmp_path / "c.json", publish_gateway=True)
    assert [rule.get("path") for rule in config["ingress"]] == [
        "^/internal/worker/",
        "^/v1/",
        None,
    ]
    assert config["ingress"][-1] == {"service": "http_status:404"}


def test_port_comes_from_settings_port_offset() -> None:
    settings = Settings(_env_file=None, PORT_OFFSET=10000, API_HOST_PORT=None)  # type: ignore[call-arg]
    config = build_config("t", "cp.example.com", settings.api_port, Path("c.json"))
    assert config["ingress"][0]["service"] == "http://127.0.0.1:18003"


def test_hostname_must_be_bare() -> None:
    with pytest.raises(NamedTunnelError, match=r"--hostname cp\.example\.com$"):
        check_hostname("https://cp.example.com/")
    assert public_url("CP.Example.com") == "https://cp.example.com"


def test_credentials_are_found_for_a_tunnel_uuid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    tunnel_id = str(uuid.uuid4())
    creds = tmp_path / ".cloudflared" / f"{tunnel_id}.json"
    creds.parent.mkdir()
    creds.write_text(json.dumps({"TunnelID": tunnel_id}))
    assert resolve_credentials_file("cloudflared", tunnel_id, None) == creds.resolve()


def test_missing_credentials_explain_how_to_create_the_tunnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cloudflared to ask
    with pytest.raises(NamedTunnelError) as info:
        resolve_credentials_file("cloudflared", "inventiv-dev", None)
    assert "cloudflared tunnel create inventiv-dev" in str(info.value)
    assert "cloudflared tunnel route dns inventiv-dev" in str(info.value)
    with pytest.raises(NamedTunnelError, match="does not exist"):
        resolve_credentials_file("cloudflared", "x", tmp_path / "nope.json")


def test_named_tunnel_runs_with_its_config_and_stable_url(tmp_path: Path, api: FakeAPI) -> None:
    port = api.server.server_address[1]
    fake = make_env(tmp_path, {"API_HOST_PORT": str(port), "INVENTIV_ADMIN_TOKEN": api.state.token})
    creds = tmp_path / "creds.json"
    creds.write_text("{}")
    argv = [
        *CLI,
        "tunnel",
        "--named",
        "inventiv-dev",
        "--hostname",
        "cp.example.com",
        "--credentials-file",
        str(creds),
        "--publish-gateway",
    ]
    running = Running(argv, fake.env)
    try:
        wait_for(lambda: api.state.puts, what="the announcement")
        assert api.state.puts == [{"url": "https://cp.example.com"}]
        assert "WORKER_CONTROL_PLANE_URL=https://cp.example.com\n" in read_env_file(fake.env_file)
        started = fake.events()[0]
        assert started["mode"] == "named"
        config_file = tmp_path / "data" / "cloudflared-inventiv-dev.yml"
        config = yaml.safe_load(config_file.read_text())
        assert config["credentials-file"] == str(creds.resolve())
        assert config["ingress"][0]["service"] == f"http://127.0.0.1:{port}"
        # the stand-in applies the ingress: worker path and gateway reach the API...
        with httpx.Client(base_url=started["url"], verify=fake.ssl_context()) as client:
            assert client.get("/internal/worker/ping").json()["ok"] is True
            assert client.get("/v1/models").status_code == 200
            # ...the admin API and the root never do (404 from the edge, not the API's 401)
            admin = client.get("/api/control-plane-url")
            assert (admin.status_code, admin.content) == (404, b"")
            assert client.get("/").status_code == 404
    finally:
        running.stop()
