"""Bring your own GPU machine: Inventiv creates the record and tokens, the operator starts the
agent by hand with the environment the create call returned."""

from __future__ import annotations

from inventiv.providers.base import Machine, MachineSpec, MachineState, Offer, WorkerBoot


class ManualProvider:
    name = "manual"
    can_list = False

    async def create(self, spec: MachineSpec, boot: WorkerBoot) -> Machine:
        return Machine(provider_id=f"manual-{spec.instance_id}", state=MachineState.RUNNING)

    async def get(self, provider_id: str) -> Machine:
        # Inventiv cannot see the operator's machine; its heartbeats are the only signal.
        return Machine(provider_id=provider_id, state=MachineState.UNKNOWN)

    async def terminate(self, provider_id: str) -> None:
        # Nothing to delete: revoking the tokens makes the agent stop its engine and exit.
        return None

    async def list_tagged(self, tag: str) -> list[Machine]:
        return []

    async def catalog(self) -> list[Offer]:
        return []

    async def close(self) -> None:
        return None
