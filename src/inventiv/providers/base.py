"""The one interface every machine provider implements (manual, local, scaleway).

The orchestrator never knows how a machine is made: it asks a provider to create one with a spec
and the worker's boot settings, polls its state, and asks it to terminate until it is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class MachineState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPED = "stopped"
    GONE = "gone"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class MachineSpec:
    """What the operator asked for."""

    instance_id: str
    model: str
    zone: str | None = None
    instance_type: str | None = None
    image: str | None = None
    engine: str = "vllm"
    engine_args: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerBoot:
    """What the worker agent on the machine needs to find and authenticate to the control plane.

    The bootstrap token is single-use and expires, so it is the only secret a machine is given.
    """

    control_plane_url: str
    instance_id: str
    bootstrap_token: str
    model: str
    engine: str

    def agent_env(self) -> dict[str, str]:
        return {
            "WORKER_CONTROL_PLANE_URL": self.control_plane_url,
            "INSTANCE_ID": self.instance_id,
            "INVENTIV_BOOTSTRAP_TOKEN": self.bootstrap_token,
            "WORKER_MODEL_ID": self.model,
            "WORKER_ENGINE": self.engine,
        }


@dataclass(frozen=True)
class Machine:
    provider_id: str
    state: MachineState
    zone: str | None = None
    instance_type: str | None = None
    address: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Offer:
    """One machine type a provider can create, with its price, for the catalog."""

    instance_type: str
    zone: str
    gpus: int
    gpu_name: str | None
    gpu_memory_gb: float | None
    hourly_price_eur: float | None
    extra: dict[str, str] = field(default_factory=dict)


class ProviderError(Exception):
    """A provider call failed; `code` is stable and `message` says what to fix."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class Provider(Protocol):
    name: str
    # Whether list_tagged sees every machine the provider made. Reconciliation trusts an absent
    # machine to be gone only then: a manual worker's machine is invisible, not deleted.
    can_list: bool

    async def create(self, spec: MachineSpec, boot: WorkerBoot) -> Machine: ...

    async def get(self, provider_id: str) -> Machine: ...

    async def terminate(self, provider_id: str) -> None: ...

    async def list_tagged(self, tag: str) -> list[Machine]: ...

    async def catalog(self) -> list[Offer]: ...

    async def close(self) -> None: ...
