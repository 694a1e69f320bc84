"""The admin API's request and response models (`/api/*`), shared by the code that serves them
and the OpenAPI document the API publishes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ProviderName = Literal["manual", "local", "scaleway"]


class CreateInstanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: ProviderName = Field(description="Where the machine comes from.")
    model: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="Model id the engine serves, e.g. Qwen/Qwen2.5-7B-Instruct, or 'echo'."
    )
    engine: Literal["vllm", "echo"] | None = Field(
        default=None, description="Inference engine; defaults to echo for model 'echo'."
    )
    zone: Annotated[str, Field(max_length=64)] | None = None
    instance_type: Annotated[str, Field(max_length=64)] | None = None
    image: Annotated[str, Field(max_length=256)] | None = None
    engine_args: Annotated[str, Field(max_length=2000)] | None = None
    replace_on_failure: bool = Field(
        default=False, description="Create a replacement if this instance is lost."
    )


class InstanceView(BaseModel):
    id: str
    provider: str
    provider_id: str | None
    zone: str | None
    instance_type: str | None
    model: str
    status: str
    progress: int = Field(description="0-100, how far the instance is on its way to ready.")
    desired_state: str
    error_code: str | None
    error_message: str | None
    worker_id: str | None
    agent_version: str | None
    address: str | None
    engine_port: int | None
    health_port: int | None
    gpus: list[Any]
    worker_status: str | None
    queue_depth: int | None
    requests_running: int | None
    metrics: dict[str, Any]
    last_heartbeat_at: datetime | None
    heartbeat_seq: int | None
    created_at: datetime
    status_changed_at: datetime
    ready_at: datetime | None
    terminated_at: datetime | None
    replace_on_failure: bool
    replaces_id: str | None


class CreatedInstance(InstanceView):
    bootstrap_token: str | None = Field(
        default=None,
        description="Manual instances only: single use, shown only in this response. Machines "
        "Inventiv creates get theirs in their boot settings and it is never shown.",
    )
    bootstrap_token_expires_at: datetime | None = None
    agent_env: dict[str, str] | None = Field(
        default=None,
        description="Manual instances: the environment to give `inventiv worker` on the machine.",
    )
    agent_command: str | None = None
    warnings: list[str] = []


class InstanceList(BaseModel):
    items: list[InstanceView]
    count: int


class EventView(BaseModel):
    id: int
    at: datetime
    kind: str
    from_status: str | None
    to_status: str | None
    reason: str | None
    message: str | None
    data: dict[str, Any]


class EventList(BaseModel):
    items: list[EventView]


class ControlPlaneURLUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(max_length=2048)]


class ControlPlaneURLView(BaseModel):
    url: str | None
    source: Literal["runtime", "settings", "unset"]
    pushed_to: int = 0


class ApiStatus(BaseModel):
    service: str
    version: str
    orchestrator: Literal["ok", "unreachable"]
