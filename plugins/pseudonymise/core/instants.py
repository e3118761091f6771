"""UTC instants as the plugin writes them: to the second (token claims, audit columns, escrow's associated
data) or to the microsecond (the audit's hashed JSON, checkpoints)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_seconds(value: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` of an aware instant."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_micros(value: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` of an aware instant."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
