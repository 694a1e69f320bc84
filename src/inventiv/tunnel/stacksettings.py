"""Load the stack's Settings even when WORKER_CONTROL_PLANE_URL is wrong.

`Settings` refuses an invalid WORKER_CONTROL_PLANE_URL, which is right for the services but
would lock out the very commands that repair it (`inventiv tunnel` rewrites it, `inventiv
doctor` explains it). These helpers load everything else normally and read the raw URL aside.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from inventiv.config import Settings, env_file_path, load_settings
from inventiv.tunnel.envfile import read_env_var

URL_KEY = "WORKER_CONTROL_PLANE_URL"


def load_stack_settings() -> Settings:
    """Settings with the URL left out, so a bad URL cannot stop the commands that fix it."""
    return load_settings(**{URL_KEY: None})


@dataclass(frozen=True)
class ConfiguredURL:
    """The raw WORKER_CONTROL_PLANE_URL and where it came from (for messages)."""

    value: str | None
    source: str
    env_file: Path


def configured_url() -> ConfiguredURL:
    """The environment wins over the env file, as in `Settings`."""
    env_file = env_file_path()
    from_env = os.environ.get(URL_KEY)
    if from_env is not None and from_env.strip():
        return ConfiguredURL(from_env.strip(), f"the {URL_KEY} environment variable", env_file)
    from_file = read_env_var(env_file, URL_KEY)
    if from_file is not None and from_file.strip():
        return ConfiguredURL(from_file.strip(), str(env_file), env_file)
    return ConfiguredURL(None, str(env_file), env_file)
