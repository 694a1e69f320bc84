"""The operator's API, `/api/*`, bearer INVENTIV_ADMIN_TOKEN.

Defined once: the orchestrator serves these routes (it owns the records) and the public API
publishes them in its OpenAPI document while forwarding the requests to the orchestrator.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from inventiv.config import ControlPlaneURLError
from inventiv.errors import HTTPError
from inventiv.orchestrator.instances import InstanceService
from inventiv.protocol import ErrorBody
from inventiv.schemas import (
    ControlPlaneURLUpdate,
    ControlPlaneURLView,
    CreatedInstance,
    CreateInstanceRequest,
    EventList,
    InstanceList,
    InstanceView,
)

_bearer = HTTPBearer(auto_error=False, description="INVENTIV_ADMIN_TOKEN")

ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Malformed JSON",
        401: "Missing or wrong admin token",
        404: "Unknown instance",
        413: "Body over 64 KiB",
        422: "Invalid field",
    }.items()
}


def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected: str = request.app.state.admin_token
    if credentials is None:
        raise HTTPError(
            401,
            "missing_token",
            "The admin API needs `Authorization: Bearer <INVENTIV_ADMIN_TOKEN>`; the token is "
            "printed by `inventiv up` and stored in the stack's data directory.",
            [(b"www-authenticate", b"Bearer")],
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPError(
            401,
            "invalid_token",
            "The admin token is wrong; use the one printed by `inventiv up` "
            "(or INVENTIV_ADMIN_TOKEN).",
            [(b"www-authenticate", b"Bearer")],
        )


router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], responses=ERRORS)


def service(request: Request) -> InstanceService:
    return request.app.state.instances


Service = Annotated[InstanceService, Depends(service)]


@router.post("/instances", status_code=201, response_model=CreatedInstance, tags=["instances"])
async def create_instance(body: CreateInstanceRequest, svc: Service) -> CreatedInstance:
    """Create an instance. For `manual`, the answer holds the bootstrap token (shown once) and
    the environment to give `inventiv worker` on your machine."""
    return await svc.create(body)


@router.get("/instances", response_model=InstanceList, tags=["instances"])
async def list_instances(
    svc: Service,
    status: Annotated[str | None, Query(max_length=32)] = None,
    include_terminated: bool = True,
) -> InstanceList:
    return await svc.list(status=status, include_terminated=include_terminated)


@router.get("/instances/{instance_id}", response_model=InstanceView, tags=["instances"])
async def get_instance(instance_id: str, svc: Service) -> InstanceView:
    return await svc.get(instance_id)


@router.get("/instances/{instance_id}/events", response_model=EventList, tags=["instances"])
async def instance_events(
    instance_id: str, svc: Service, limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> EventList:
    return await svc.events(instance_id, limit)


@router.delete(
    "/instances/{instance_id}", status_code=202, response_model=InstanceView, tags=["instances"]
)
async def terminate_instance(instance_id: str, svc: Service) -> InstanceView:
    """Terminate: the machine is released, then the instance's tokens are revoked."""
    return await svc.terminate(instance_id)


@router.get("/control-plane-url", response_model=ControlPlaneURLView, tags=["settings"])
async def get_control_plane_url(request: Request) -> ControlPlaneURLView:
    current = request.app.state.control_url
    return ControlPlaneURLView(url=current(), source=current.source)


@router.put("/control-plane-url", response_model=ControlPlaneURLView, tags=["settings"])
async def set_control_plane_url(
    body: ControlPlaneURLUpdate, request: Request
) -> ControlPlaneURLView:
    """Change WORKER_CONTROL_PLANE_URL without a restart and push it to live workers."""
    current = request.app.state.control_url
    try:
        pushed = await current.set(body.url)
    except ControlPlaneURLError as exc:
        raise HTTPError(422, "invalid_control_plane_url", f"Field 'url': {exc}") from None
    return ControlPlaneURLView(url=current(), source=current.source, pushed_to=pushed)
