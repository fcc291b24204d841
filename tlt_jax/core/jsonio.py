"""Strict JSON for everything the package writes (metrics, samples, benchmark results).

A value not measured yet is NaN in memory; Python's ``json`` would write it as the non-standard token ``NaN``,
which ``jq``, JavaScript and most JSON readers reject. Here every non-finite float becomes ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(x) for x in value]
    return value


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded to ``digits`` places, through dicts (console lines)."""
    if isinstance(value, dict):
        return {k: rounded(x, digits) for k, x in value.items()}
    return round(value, digits) if isinstance(value, float) else value


def json_line(record: Dict[str, Any]) -> str:
    """One strict-JSON line, newline-terminated."""
    return json.dumps(finite_or_null(record), allow_nan=False) + "\n"


def dump(payload: Any, f, **kwargs) -> None:
    """``json.dump`` of ``payload`` as strict JSON."""
    json.dump(finite_or_null(payload), f, allow_nan=False, **kwargs)
