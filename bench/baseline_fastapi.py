"""The comparison point for the heartbeat benchmark: one plain FastAPI process doing the same
work per heartbeat (pydantic validation of the same message, the token check, the write), the
way it is usually written: a pydantic body parameter, a header dependency, and one SELECT and
one UPDATE per request (sqlite3 on one connection in WAL mode with synchronous=NORMAL, or an
asyncpg pool of 10), with no cache and no batching.

Run: python bench/baseline_fastapi.py <port> <database url>
"""

import json
import sqlite3
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException

from inventiv.protocol import HeartbeatRequest, HeartbeatResponse, hash_token

SELECT = "SELECT instance_id FROM worker_tokens WHERE token_hash = {p1} AND revoked_at IS NULL"
UPDATE = (
    "UPDATE instances SET last_heartbeat_at = {p1}, heartbeat_seq = {p2}, worker_status = {p3}, "
    "queue_depth = {p4}, requests_running = {p5}, metrics = {p6} WHERE id = {p7}"
)


class SqliteDB:
    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.marks = {f"p{i}": "?" for i in range(1, 8)}

    async def owner(self, token_hash: str) -> str | None:
        row = self.conn.execute(SELECT.format(**self.marks), (token_hash,)).fetchone()
        return row[0] if row else None

    async def write(self, *values: Any) -> None:
        self.conn.execute(UPDATE.format(**self.marks), values)


class PostgresDB:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: Any = None
        self.marks = {f"p{i}": f"${i}" for i in range(1, 8)}

    async def connect(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(self.dsn, min_size=10, max_size=10)

    async def owner(self, token_hash: str) -> str | None:
        return await self.pool.fetchval(SELECT.format(**self.marks), token_hash)

    async def write(self, *values: Any) -> None:
        await self.pool.execute(UPDATE.format(**self.marks), *values)


def build(database_url: str) -> FastAPI:
    if database_url.startswith("sqlite"):
        db: Any = SqliteDB(database_url.split("///", 1)[1])
    else:
        db = PostgresDB(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    app = FastAPI(on_startup=[db.connect] if isinstance(db, PostgresDB) else [])

    async def bearer(authorization: Annotated[str, Header()]) -> str:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise HTTPException(401, "missing token")
        return value

    @app.post("/internal/worker/heartbeat")
    async def heartbeat(
        body: HeartbeatRequest, token: Annotated[str, Depends(bearer)]
    ) -> HeartbeatResponse:
        instance_id = str(body.instance_id)
        if await db.owner(hash_token(token)) != instance_id:
            raise HTTPException(403, "token mismatch")
        now = datetime.now(UTC)
        metrics = json.dumps({"gpus": [g.model_dump(exclude_none=True) for g in body.gpus]})
        stamp = now.replace(tzinfo=None) if isinstance(db, SqliteDB) else now
        await db.write(
            stamp,
            body.seq,
            body.status.value,
            body.queue_depth,
            body.requests_running,
            metrics,
            instance_id,
        )
        return HeartbeatResponse(heartbeat_interval_s=3.0, desired_state="run")

    return app


if __name__ == "__main__":
    port, url = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        build(url),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
