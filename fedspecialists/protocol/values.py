"""Reading values out of Flower records, for every method's protocol: one error type.

Each reader names the key it could not read; the protocols turn that into a rejected reply.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from flwr.app import ConfigRecord, MetricRecord, RecordDict


class ProtocolError(ValueError):
    """A message that breaks its method's protocol; the message says what is wrong."""


def valid(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def count(record: MetricRecord | ConfigRecord, key: str) -> float:
    value = record.get(key)
    if not valid(value) or value < 0:
        raise ProtocolError(f"metric '{key}' missing or invalid ({value!r})")
    return float(value)


def number(record: MetricRecord | ConfigRecord, key: str) -> float:
    value = record.get(key)
    if not valid(value):
        raise ProtocolError(f"'{key}' missing or not a number ({value!r})")
    return float(value)


def optional_count(record: MetricRecord, key: str) -> float | None:
    value = record.get(key)
    return float(value) if valid(value) and value >= 0 else None


def optional_int(record: MetricRecord, key: str) -> int | None:
    value = optional_count(record, key)
    return None if value is None else int(value)


def optional_counts(record: MetricRecord, key: str) -> list[int] | None:
    values = record.get(key)
    if not isinstance(values, list):
        return None
    counts = [v for v in values if valid(v) and v >= 0]
    return [int(v) for v in counts] if len(counts) == len(values) else None


def string_list(record: ConfigRecord, key: str) -> list[Any]:
    value = record.get(key, [])
    if not isinstance(value, list):
        raise ProtocolError(f"'{key}' must be a list, not {value!r}")
    return value


def optional_str(record: ConfigRecord, key: str) -> str | None:
    value = record.get(key)
    return None if value is None or value == "" else str(value)


def instruction_config(content: RecordDict, name: str = "config") -> ConfigRecord:
    """The server's config record of an instruction; it must name its ``server-round``."""
    config = content.config_records.get(name)
    if config is None or "server-round" not in config:
        raise ProtocolError(f"no '{name}' record with 'server-round'")
    return config
