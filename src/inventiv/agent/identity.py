"""Who this worker is and how it proves it: worker id and worker token kept in WORKER_STATE_DIR,
the one-time bootstrap token, and which of them the control plane has refused."""

from __future__ import annotations

import logging
import os
import uuid
from enum import StrEnum
from pathlib import Path
from uuid import UUID

from inventiv.config import write_private_file
from inventiv.protocol import hash_token

from .config import ConfigError, parse_uuid

log = logging.getLogger("inventiv.agent")

WORKER_TOKEN_FILE = "worker-token"
WORKER_ID_FILE = "worker-id"


class TokenKind(StrEnum):
    WORKER = "worker token"
    BOOTSTRAP = "bootstrap token"


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text or None


class Credentials:
    """The tokens this agent may present, best first: the stored worker token, then bootstrap.

    A refused token is remembered (by hash) so re-registration moves on to the next one instead
    of presenting the same refused token forever.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        bootstrap_token: str | None = None,
        bootstrap_token_file: Path | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        self.state_dir = state_dir
        self._bootstrap_token = bootstrap_token.strip() if bootstrap_token else None
        self._bootstrap_token_file = bootstrap_token_file
        self._worker_id = worker_id
        self._refused: set[str] = set()
        self.worker_token: str | None = None

    def load(self) -> None:
        """Create the state dir (0700) and read or create the persisted worker id and token."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.state_dir, 0o700)
        except OSError as exc:
            raise ConfigError(f"WORKER_STATE_DIR {str(self.state_dir)!r}: {exc}.") from None
        if self._worker_id is None:
            path = self.state_dir / WORKER_ID_FILE
            stored = _read(path)
            if stored is not None:
                self._worker_id = parse_uuid(str(path), stored)
            else:
                self._worker_id = uuid.uuid4()
                write_private_file(path, f"{self._worker_id}\n")
        self.worker_token = _read(self.token_path)
        if self.worker_token is None and self.bootstrap_token() is None:
            raise ConfigError(
                "No token: set INVENTIV_BOOTSTRAP_TOKEN or INVENTIV_BOOTSTRAP_TOKEN_FILE (the "
                f"instance's bootstrap token), or keep the worker token in {self.token_path}."
            )

    @property
    def worker_id(self) -> UUID:
        if self._worker_id is None:
            raise RuntimeError("Credentials.load() was not called")
        return self._worker_id

    @property
    def token_path(self) -> Path:
        return self.state_dir / WORKER_TOKEN_FILE

    def bootstrap_token(self) -> str | None:
        """Re-read on every use: the operator may put a fresh bootstrap token in the file."""
        if self._bootstrap_token_file is not None:
            value = _read(self._bootstrap_token_file)
            if value:
                return value
        return self._bootstrap_token

    def pick(self) -> tuple[str, TokenKind] | None:
        """The best token not yet refused, or None when every one we have was refused."""
        if self.worker_token and hash_token(self.worker_token) not in self._refused:
            return self.worker_token, TokenKind.WORKER
        bootstrap = self.bootstrap_token()
        if bootstrap and hash_token(bootstrap) not in self._refused:
            return bootstrap, TokenKind.BOOTSTRAP
        return None

    def refuse(self, token: str) -> None:
        self._refused.add(hash_token(token))

    def store_worker_token(self, token: str) -> None:
        """Keep the worker token (shown once by the control plane) for the next restart."""
        write_private_file(self.token_path, token + "\n")
        self.worker_token = token
        self._refused.discard(hash_token(token))
