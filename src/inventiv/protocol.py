"""The worker <-> control plane messages (protocol version 1), shared by the agent and the
orchestrator so the two sides cannot drift apart. Described for humans in docs/worker-protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import StrEnum
from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
REGISTER_PATH = "/internal/worker/register"
HEARTBEAT_PATH = "/internal/worker/heartbeat"
PING_PATH = "/internal/worker/ping"
WORKER_PATH_PREFIX = "/internal/worker/"
CONTROL_URL_PATH = "/control/url"
PROTOCOL_HEADER = "x-inventiv-protocol"
SIGNATURE_HEADER = "x-inventiv-signature"
TIMESTAMP_HEADER = "x-inventiv-timestamp"
CONTROL_MAX_SKEW_S = 300
REQUEST_ID_HEADER = "x-request-id"


class WorkerStatus(StrEnum):
    """What a worker says about itself in a heartbeat."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    ERROR = "error"


class DesiredState(StrEnum):
    """What the control plane asks the worker to do next."""

    RUN = "run"
    DRAIN = "drain"
    TERMINATE = "terminate"


class _Message(BaseModel):
    # Unknown fields are refused: a typo in an agent must fail loudly, not be silently dropped.
    model_config = ConfigDict(extra="forbid", frozen=True)


NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
ShortStr = Annotated[str, Field(max_length=256)]


class GpuInfo(_Message):
    index: NonNegInt
    name: ShortStr
    memory_total_mb: NonNegInt | None = None
    uuid: ShortStr | None = None


class HostFacts(_Message):
    hostname: ShortStr | None = None
    cpu_count: NonNegInt | None = None
    memory_total_mb: NonNegInt | None = None
    os: ShortStr | None = None
    python: ShortStr | None = None


class RegisterRequest(_Message):
    instance_id: UUID
    worker_id: UUID
    agent_version: ShortStr
    model_id: ShortStr | None = None
    engine_port: Port | None = None
    health_port: Port | None = None
    address: ShortStr | None = None
    gpus: Annotated[list[GpuInfo], Field(max_length=64)] = []
    host: HostFacts | None = None
    simulated: bool = False


class RegisterResponse(_Message):
    worker_token: str | None = None
    heartbeat_interval_s: float
    status: str
    protocol_version: int = PROTOCOL_VERSION


class GpuStats(_Message):
    index: NonNegInt
    utilization: Annotated[float, Field(ge=0, le=100)] | None = None
    memory_used_mb: NonNegFloat | None = None
    memory_total_mb: NonNegFloat | None = None
    temperature_c: float | None = None
    power_w: NonNegFloat | None = None


class SystemStats(_Message):
    cpu_percent: Annotated[float, Field(ge=0, le=100)] | None = None
    memory_used_mb: NonNegFloat | None = None
    memory_total_mb: NonNegFloat | None = None
    disk_used_gb: NonNegFloat | None = None
    disk_total_gb: NonNegFloat | None = None
    load1: NonNegFloat | None = None


class HeartbeatRequest(_Message):
    instance_id: UUID
    worker_id: UUID
    seq: NonNegInt
    status: WorkerStatus
    model_id: ShortStr | None = None
    queue_depth: NonNegInt | None = None
    requests_running: NonNegInt | None = None
    gpus: Annotated[list[GpuStats], Field(max_length=64)] = []
    system: SystemStats | None = None
    simulated: bool = False
    error: Annotated[str, Field(max_length=2000)] | None = None


class HeartbeatResponse(_Message):
    heartbeat_interval_s: float
    desired_state: DesiredState
    control_plane_url: str | None = None


class ErrorBody(BaseModel):
    """The one error shape of every Inventiv endpoint: a stable code and a sentence saying what
    to fix."""

    error: str
    message: str


class ControlUrlUpdate(_Message):
    """Pushed by the control plane to a live agent when WORKER_CONTROL_PLANE_URL changes."""

    control_plane_url: str


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 is enough; only this hash is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def sign_control_request(token_hash: str, timestamp: str, body: bytes) -> str:
    """Sign a control-plane -> agent request with the worker token's hash as the HMAC key.

    Both sides know that hash (the agent hashes its own token) and nobody else needs to: no
    extra secret is stored, and the timestamp bounds replays.
    """
    mac = hmac.new(token_hash.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return mac.hexdigest()


def verify_control_request(
    token_hash: str, timestamp: str, body: bytes, signature: str, now: float
) -> bool:
    try:
        skew = abs(now - float(timestamp))
    except ValueError:
        return False
    if skew > CONTROL_MAX_SKEW_S:
        return False
    expected = sign_control_request(token_hash, timestamp, body)
    return hmac.compare_digest(expected, signature)
