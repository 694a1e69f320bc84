"""Machine providers behind one interface; `build_providers` is the registry."""

from __future__ import annotations

from inventiv.config import Settings
from inventiv.providers.base import Provider
from inventiv.providers.local import LocalProvider
from inventiv.providers.manual import ManualProvider

PROVIDER_NAMES = ("manual", "local", "scaleway")


def build_providers(settings: Settings) -> dict[str, Provider]:
    """The providers this stack can use; cloud ones appear only when configured."""
    providers: dict[str, Provider] = {"manual": ManualProvider(), "local": LocalProvider(settings)}
    return providers
