"""Where the control plane is: WORKER_CONTROL_PLANE_URL or the file that holds it, re-read after
failures so a quick tunnel that came back under a new name is followed without a restart."""

from __future__ import annotations

import logging
from pathlib import Path

from inventiv.config import (
    ControlPlaneURLError,
    read_url_file,
    validate_control_plane_url,
    write_private_file,
)

from .config import ConfigError

log = logging.getLogger("inventiv.agent")


def describe_url_error(exc: ControlPlaneURLError) -> str:
    """One sentence naming the broken rule, for logs, exit messages and HTTP 422 bodies."""
    return f"invalid control-plane URL (rule {exc.rule}): {exc}"


class ControlPlaneUrl:
    """The control-plane base URL in use, and the places it can change from.

    The file wins over the environment variable (same precedence as the control plane's own
    Settings.control_plane_url), because the file is what a tunnel rewrites.
    """

    def __init__(self, env_url: str | None, url_file: Path | None) -> None:
        self._env_url = env_url.strip() if env_url and env_url.strip() else None
        self.url_file = url_file
        self._current: str | None = None
        self._bad_file_value: str | None = None

    @property
    def current(self) -> str:
        if self._current is None:
            raise RuntimeError("ControlPlaneUrl.load() was not called")
        return self._current

    def load(self) -> str:
        """The URL to start with; raises ConfigError naming the rule when it is invalid."""
        from_file = read_url_file(self.url_file) if self.url_file is not None else None
        raw = from_file or self._env_url
        if raw is None:
            where = f"WORKER_CONTROL_PLANE_URL_FILE ({self.url_file})" if self.url_file else ""
            raise ConfigError(
                f"No control-plane URL: {where or 'WORKER_CONTROL_PLANE_URL'} is empty or "
                "missing. Set WORKER_CONTROL_PLANE_URL or write the URL into the file."
            )
        try:
            self._current = validate_control_plane_url(raw)
        except ControlPlaneURLError as exc:
            source = "WORKER_CONTROL_PLANE_URL_FILE" if from_file else "WORKER_CONTROL_PLANE_URL"
            raise ConfigError(f"{source}: {describe_url_error(exc)}") from None
        return self._current

    def refresh(self) -> bool:
        """Re-read the URL file; adopt a new valid value. Returns True when the URL changed."""
        if self.url_file is None:
            return False
        raw = read_url_file(self.url_file)
        if raw is None or raw == self._current:
            return False
        try:
            url = validate_control_plane_url(raw)
        except ControlPlaneURLError as exc:
            if raw != self._bad_file_value:  # say it once, not on every retry
                self._bad_file_value = raw
                log.error("ignoring %s: %s", self.url_file, describe_url_error(exc))
            return False
        self._set(url, f"from {self.url_file.name}")
        return True

    def adopt(self, raw: str, source: str) -> bool:
        """Take a URL the control plane pushed (heartbeat response or POST /control/url).

        Raises ControlPlaneURLError when it breaks a rule. The file, when configured, is
        rewritten too, so the next re-read after a failure does not revert to the old URL.
        """
        url = validate_control_plane_url(raw)
        if url == self._current:
            return False
        if self.url_file is not None:
            write_private_file(self.url_file, url + "\n")
        self._set(url, source)
        return True

    def _set(self, url: str, source: str) -> None:
        log.info("control-plane URL changed (%s): %s -> %s", source, self._current, url)
        self._current = url
        self._bad_file_value = None
