"""What the agent knows about itself right now, shared by the control loop (which writes it) and
the health server (which reads it), so /readyz and /metrics never disagree with heartbeats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from inventiv.protocol import DesiredState, WorkerStatus


@dataclass
class AgentState:
    started_at: float = field(default_factory=time.monotonic)
    registered: bool = False
    status: WorkerStatus = WorkerStatus.STARTING
    desired_state: DesiredState = DesiredState.RUN
    engine_ready: bool = False
    engine_restarts: int = 0
    engine_pid: int | None = None
    heartbeats_ok: int = 0
    heartbeat_failures: int = 0
    register_failures: int = 0
    registrations: int = 0
    url_changes: int = 0
    last_heartbeat_ok_at: float | None = None
    unreachable_since: float | None = None
    queue_depth: int | None = None
    requests_running: int | None = None
    control_plane_url: str | None = None

    @property
    def ready(self) -> bool:
        """Ready for traffic: engine serving the model and the control plane knows about us."""
        return self.registered and self.engine_ready and self.status is WorkerStatus.READY
