"""Instance-wide settings: the model of the one row of `outbox.settings` (read by workers per
batch; stored by `outbox.store.settings`).

CLI keys are the column names with dashes: `outbox settings set retry-base-seconds 1`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from outbox.core.errors import ValidationError
from outbox.core.message import check_address


class Settings(BaseModel):
    """Runtime policy. Defaults match schema.sql."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    unmonitored_address: str | None = Field(None, description="From of automated (system) mail")
    retry_base_seconds: float = Field(60, gt=0, description="first retry delay; doubles per attempt")
    retry_max_seconds: float = Field(3600, gt=0, description="longest retry delay")
    max_attempts: int = Field(10, ge=1, le=10, description="automatic attempts (1-10)")
    max_age_seconds: float = Field(432000, gt=0, description="give up on a message after this long")
    lease_seconds: float = Field(
        300, gt=0, description="how long a dispatch or send may go unrenewed before re-dispatch"
    )
    max_message_bytes: int = Field(
        26214400, ge=1024, le=104857600, description="largest message accepted at enqueue"
    )
    smtp_timeout_seconds: float = Field(60, gt=0, description="per SMTP command (and upload stall)")
    # Servers scan large messages before they answer; RFC 5321 4.5.3.2.6 recommends 10 minutes.
    smtp_dot_timeout_seconds: float = Field(
        600, gt=0, description="reply to the final dot, counted once the content has left"
    )
    ambiguous_policy: Literal["retry", "hold"] = Field(
        "retry", description="after a connection lost past the final dot: retry or hold"
    )
    additional_bcc: list[str] = Field([], description="comma-separated; copied on all outgoing mail")
    override_to: list[str] = Field([], description="test environments: all mail goes only to these")
    override_cc: list[str] = Field([], description="test environments, like override-to")
    override_bcc: list[str] = Field([], description="test environments, like override-to")
    retention_days: int = Field(
        0, ge=0, description="delete finished messages and their history after this many days; 0 keeps them"
    )
    audit_retention_days: int = Field(
        0,
        ge=0,
        description="delete connector activity and operator audit rows after this many days; 0 keeps",
    )

    @field_validator("unmonitored_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return check_address(value, "unmonitored-address") if value else None

    @field_validator("additional_bcc", "override_to", "override_cc", "override_bcc")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [check_address(a, "address") for a in value]

    @property
    def overrides_active(self) -> bool:
        return bool(self.override_to or self.override_cc or self.override_bcc)


KEYS = tuple(name.replace("_", "-") for name in Settings.model_fields)


def parse_value(key: str, raw: str) -> Any:
    """Turn the CLI text into the column's value (lists are comma-separated; empty clears)."""
    field = key.replace("-", "_")
    if field not in Settings.model_fields:
        raise ValidationError(f"unknown setting {key!r}; known: {', '.join(KEYS)}")
    annotation = str(Settings.model_fields[field].annotation)
    if "list" in annotation:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if raw.strip() == "" and "None" in annotation:
        return None
    return raw.strip()
