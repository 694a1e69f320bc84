"""Unit tests of the agent's small parts: backoff, Prometheus parsing, GPU/system probes,
control-plane URL sources, worker identity, error classification."""

from __future__ import annotations

import random
import stat
import sys
import types
import uuid
from pathlib import Path

import httpx
import pytest

from inventiv.agent.backoff import Backoff, jittered
from inventiv.agent.client import FailureKind, classify
from inventiv.agent.config import AgentConfig, ConfigError, EngineKind
from inventiv.agent.engine import build_engine_spec
from inventiv.agent.identity import Credentials, TokenKind
from inventiv.agent.metrics import (
    GpuProbe,
    SystemProbe,
    host_facts,
    parse_prometheus,
    queue_from_metrics,
)
from inventiv.agent.urls import ControlPlaneUrl
from inventiv.config import ControlPlaneURLError

# --------------------------------------------------------------------------- backoff


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    backoff = Backoff(0.5, 60.0, rng=random.Random(1))
    ceilings = []
    for _ in range(12):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert ceilings[-1] == 60.0
    # Full jitter: delays spread over [0, ceiling], not bunched near it.
    samples = [Backoff(0.5, 60.0, rng=random.Random(i)) for i in range(200)]
    for b in samples:
        b.attempt = 10
    delays = [b.next_delay() for b in samples]
    assert min(delays) < 10 and max(delays) > 50
    backoff.reset()
    assert backoff.ceiling() == 0.5


def test_backoff_without_jitter_and_huge_attempt() -> None:
    backoff = Backoff(1.0, 60.0, jitter=False)
    assert [backoff.next_delay() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    backoff.attempt = 10_000
    assert backoff.next_delay() == 60.0


def test_heartbeat_jitter_stays_within_ten_percent() -> None:
    rng = random.Random(3)
    values = [jittered(3.0, 0.1, rng) for _ in range(500)]
    assert all(2.7 <= v <= 3.3 for v in values)
    assert max(values) - min(values) > 0.4  # actually jittered


# --------------------------------------------------------------------------- prometheus

VLLM_METRICS = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta/llama 3"} 4.0
vllm:num_requests_waiting{engine="1",model_name="odd \\"quoted\\" {name}"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0 1712345678000
vllm:gpu_cache_usage_perc{model_name="m"} NaN
process_cpu_seconds_total 12.5
garbage line without value{
"""


def test_parse_prometheus_sums_label_sets() -> None:
    totals = parse_prometheus(VLLM_METRICS)
    assert totals["vllm:num_requests_waiting"] == 7.0
    assert totals["vllm:num_requests_running"] == 2.0
    assert totals["process_cpu_seconds_total"] == 12.5
    assert "vllm:gpu_cache_usage_perc" not in totals  # NaN is no measurement
    assert queue_from_metrics(totals) == (7, 2)


def test_queue_is_none_when_engine_exports_nothing() -> None:
    assert queue_from_metrics(parse_prometheus("up 1\n")) == (None, None)
    assert queue_from_metrics({"vllm:num_requests_waiting": float("inf")}) == (None, None)
    assert queue_from_metrics({"vllm:num_requests_waiting": 0.0}) == (0, None)


# --------------------------------------------------------------------------- probes


def test_no_gpu_means_empty_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("pynvml")

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    probe = GpuProbe()
    assert not probe.available
    assert probe.inventory() == []
    assert probe.stats() == []


def test_nvml_numbers_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("pynvml")
    mem = types.SimpleNamespace(total=80 * 1024**3, used=20 * 1024**3)
    fake.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = lambda h: mem  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetTemperature = lambda h, s: 61  # type: ignore[attr-defined]

    def power(h: int) -> int:
        if h == 1:
            raise RuntimeError("not supported")
        return 250_000

    fake.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()
    inventory = probe.inventory()
    assert [(g.index, g.name, g.memory_total_mb, g.uuid) for g in inventory] == [
        (0, "NVIDIA H100 80GB HBM3", 81920, "GPU-0"),
        (1, "NVIDIA H100 80GB HBM3", 81920, "GPU-1"),
    ]
    stats = probe.stats()
    assert stats[0].utilization == 37 and stats[0].power_w == 250.0
    assert stats[0].memory_used_mb == 20480 and stats[0].temperature_c == 61
    assert stats[1].power_w is None and stats[1].utilization == 37  # one failing field only
    probe.close()


def test_simulated_gpu_is_explicit() -> None:
    probe = GpuProbe(simulate=True)
    assert probe.inventory()[0].name.startswith("Simulated")
    assert probe.stats(load_hint=2)[0].utilization == 40.0


def test_system_stats_are_real() -> None:
    stats = SystemProbe().stats()
    assert stats.memory_total_mb and stats.memory_total_mb > 0
    assert stats.cpu_percent is not None and 0 <= stats.cpu_percent <= 100
    assert stats.disk_total_gb and stats.disk_total_gb > 0
    assert stats.load1 is not None
    facts = host_facts()
    assert facts.cpu_count and facts.hostname


# --------------------------------------------------------------------------- URLs


def test_url_from_env_validated_with_rule_named() -> None:
    assert ControlPlaneUrl("http://127.0.0.1:8003", None).load() == "http://127.0.0.1:8003"
    with pytest.raises(ConfigError, match="no_trailing_slash"):
        ControlPlaneUrl("https://x.trycloudflare.com/", None).load()
    with pytest.raises(ConfigError, match="https_required"):
        ControlPlaneUrl("http://example.com", None).load()
    with pytest.raises(ConfigError, match="No control-plane URL"):
        ControlPlaneUrl(None, None).load()


def test_url_file_wins_and_is_reread(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("https://one.trycloudflare.com\n")
    source = ControlPlaneUrl("http://127.0.0.1:1", url_file)
    assert source.load() == "https://one.trycloudflare.com"
    assert source.refresh() is False  # unchanged
    url_file.write_text("https://two.trycloudflare.com\n")
    assert source.refresh() is True
    assert source.current == "https://two.trycloudflare.com"
    url_file.write_text("https://bad.example.com/path\n")  # invalid: ignored, old URL kept
    assert source.refresh() is False
    assert source.current == "https://two.trycloudflare.com"
    url_file.unlink()
    assert source.refresh() is False


def test_adopted_url_is_written_to_the_file(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("https://one.trycloudflare.com\n")
    source = ControlPlaneUrl(None, url_file)
    source.load()
    assert source.adopt("https://new.trycloudflare.com", "test") is True
    assert url_file.read_text().strip() == "https://new.trycloudflare.com"
    assert source.adopt("https://new.trycloudflare.com", "test") is False
    with pytest.raises(ControlPlaneURLError) as info:
        source.adopt("ftp://nope", "test")
    assert info.value.rule == "absolute_https"
    assert source.current == "https://new.trycloudflare.com"


# --------------------------------------------------------------------------- identity


def test_worker_id_persisted_and_token_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    creds = Credentials(state, bootstrap_token="boot")
    creds.load()
    first_id = creds.worker_id
    again = Credentials(state, bootstrap_token="boot")
    again.load()
    assert again.worker_id == first_id
    assert again.pick() == ("boot", TokenKind.BOOTSTRAP)
    again.store_worker_token("wtok")
    assert stat.S_IMODE(creds.token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    restarted = Credentials(state)  # no bootstrap token needed any more
    restarted.load()
    assert restarted.pick() == ("wtok", TokenKind.WORKER)


def test_refused_tokens_are_skipped(tmp_path: Path) -> None:
    boot_file = tmp_path / "boot"
    boot_file.write_text("boot1\n")
    creds = Credentials(tmp_path / "s", bootstrap_token_file=boot_file)
    creds.load()
    creds.store_worker_token("w1")
    creds.refuse("w1")
    assert creds.pick() == ("boot1", TokenKind.BOOTSTRAP)
    creds.refuse("boot1")
    assert creds.pick() is None
    boot_file.write_text("boot2\n")  # the operator dropped a fresh bootstrap token in
    assert creds.pick() == ("boot2", TokenKind.BOOTSTRAP)


def test_no_token_at_all_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="INVENTIV_BOOTSTRAP_TOKEN"):
        Credentials(tmp_path / "s").load()


def test_explicit_worker_id_wins(tmp_path: Path) -> None:
    wid = uuid.uuid4()
    creds = Credentials(tmp_path / "s", bootstrap_token="b", worker_id=wid)
    creds.load()
    assert creds.worker_id == wid


# --------------------------------------------------------------------------- classification


def _response(
    status: int, body: object = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    if body is None:
        return httpx.Response(status, text="<html>nope</html>", headers=headers)
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (401, "token_revoked", FailureKind.UNAUTHORIZED),
        (401, "invalid_token", FailureKind.UNAUTHORIZED),
        (403, "token_instance_mismatch", FailureKind.FORBIDDEN),
        (404, "instance_not_found", FailureKind.GONE),
        (404, None, FailureKind.UNREACHABLE),  # a stale tunnel answering 404 is not "gone"
        (409, "instance_terminating", FailureKind.GONE),
        (422, "invalid_field", FailureKind.REJECTED),
        (502, None, FailureKind.UNREACHABLE),
        (503, "orchestrator_unreachable", FailureKind.UNREACHABLE),
    ],
)
def test_classify(status: int, code: str | None, kind: FailureKind) -> None:
    body = {"error": code, "message": "m"} if code else None
    failure = classify(_response(status, body, {"retry-after": "2"}))
    assert failure.kind is kind
    assert failure.code == code
    assert failure.retry_after_s == 2.0


# --------------------------------------------------------------------------- engine command


def _config(tmp_path: Path, **kw: object) -> AgentConfig:
    base: dict[str, object] = {
        "instance_id": uuid.UUID(int=1),
        "state_dir": tmp_path,
        "control_plane_url": "http://127.0.0.1:9",
        "model_id": "org/model",
    }
    base.update(kw)
    return AgentConfig(**base).check()  # type: ignore[arg-type]


def test_vllm_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVENTIV_BOOTSTRAP_TOKEN", "secret")
    spec = build_engine_spec(
        _config(
            tmp_path,
            engine_api_key="k1",
            engine_args=("--max-model-len", "4096", "--served-model-name", "a b"),
        ),
        8000,
    )
    assert spec.argv == (
        "vllm", "serve", "org/model", "--port", "8000", "--api-key", "k1",
        "--max-model-len", "4096", "--served-model-name", "a b",
    )  # fmt: skip
    assert spec.env["INSTANCE_ID"] == str(uuid.UUID(int=1))
    assert "INVENTIV_BOOTSTRAP_TOKEN" not in spec.env  # the engine gets no agent secret
    assert "k1" not in spec.display()


def test_echo_and_custom_commands(tmp_path: Path) -> None:
    echo = build_engine_spec(_config(tmp_path, engine=EngineKind.ECHO), 9001)
    assert echo.argv == (
        sys.executable, "-m", "inventiv.cli", "engine", "echo", "--port", "9001",
        "--model", "org/model",
    )  # fmt: skip
    custom = build_engine_spec(
        _config(
            tmp_path,
            engine=EngineKind.COMMAND,
            engine_command=("srv", "--p={port}", "{model}"),
        ),
        7,
    )
    assert custom.argv == ("srv", "--p=7", "org/model")
    assert build_engine_spec(_config(tmp_path, engine=EngineKind.NONE), 1).argv is None


def test_config_check_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="WORKER_MODEL_ID"):
        _config(tmp_path, model_id=None)
    with pytest.raises(ConfigError, match="WORKER_ENGINE_COMMAND"):
        _config(tmp_path, engine=EngineKind.COMMAND)
    with pytest.raises(ConfigError, match="WORKER_CA_BUNDLE"):
        _config(tmp_path, ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="WORKER_CONTROL_PLANE_URL"):
        _config(tmp_path, control_plane_url=None)
