"""Initial schema: instances, instance_events, worker_tokens, runtime_settings, job_leases.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from inventiv.db.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("stack_id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("provider_id", sa.String(128)),
        sa.Column("zone", sa.String(64)),
        sa.Column("instance_type", sa.String(64)),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("replace_on_failure", sa.Boolean, nullable=False),
        sa.Column("replaces_id", sa.String(36)),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("status_changed_at", UTCDateTime(), nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("desired_state", sa.String(16), nullable=False),
        sa.Column("worker_id", sa.String(36)),
        sa.Column("agent_version", sa.String(64)),
        sa.Column("address", sa.String(256)),
        sa.Column("engine_port", sa.Integer),
        sa.Column("health_port", sa.Integer),
        sa.Column("gpus", sa.JSON, nullable=False),
        sa.Column("host", sa.JSON, nullable=False),
        sa.Column("registered_at", UTCDateTime()),
        sa.Column("last_heartbeat_at", UTCDateTime()),
        sa.Column("heartbeat_seq", sa.BigInteger),
        sa.Column("worker_status", sa.String(16)),
        sa.Column("queue_depth", sa.Integer),
        sa.Column("requests_running", sa.Integer),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("ready_at", UTCDateTime()),
        sa.Column("terminated_at", UTCDateTime()),
    )
    op.create_index("ix_instances_status", "instances", ["status"])
    op.create_index("ix_instances_stack_status", "instances", ["stack_id", "status"])
    op.create_table(
        "instance_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "instance_id",
            sa.String(36),
            sa.ForeignKey("instances.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(32)),
        sa.Column("to_status", sa.String(32)),
        sa.Column("reason", sa.String(64)),
        sa.Column("message", sa.Text),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_instance_events_instance_id", "instance_events", ["instance_id"])
    op.create_table(
        "worker_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column(
            "instance_id",
            sa.String(36),
            sa.ForeignKey("instances.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime()),
        sa.Column("used_at", UTCDateTime()),
        sa.Column("revoked_at", UTCDateTime()),
    )
    op.create_index("ix_worker_tokens_instance_id", "worker_tokens", ["instance_id"])
    op.create_table(
        "runtime_settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "job_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("job_leases", "runtime_settings", "worker_tokens", "instance_events"):
        op.drop_table(table)
    op.drop_table("instances")
