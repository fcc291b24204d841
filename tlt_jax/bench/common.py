"""Shared pieces of the benchmark programs."""

from __future__ import annotations

import argparse
import math
import os
import platform
from typing import Dict, List, Sequence

from tlt_jax.app.config import split_config_args
from tlt_jax.core import jsonio

BENCH_QUESTIONS = (
    "What is 12 + 35?",
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip.",
    "How many days are there in a leap year?",
    "Describe a cat to someone who has never seen one.",
    "What is the capital of France, and why is it famous?",
    "Give me a tip for learning to cook.",
)


def questions(n: int) -> List[str]:
    return [BENCH_QUESTIONS[i % len(BENCH_QUESTIONS)] for i in range(n)]


def config_overrides(ap: argparse.ArgumentParser, rest: Sequence[str]) -> List[str]:
    """The ``--config.a.b=v`` (or ``--config.a.b v``) overrides among the arguments ``ap.parse_known_args`` left
    over, as ``['a.b=v', ...]``; anything else left over is the parser's usage error."""
    _, overrides, unknown = split_config_args(rest)
    if unknown:
        ap.error(f"unrecognised arguments: {unknown}")
    return overrides


def machine_info() -> Dict[str, object]:
    import jax

    return {"platform": jax.devices()[0].platform, "device": str(jax.devices()[0].device_kind),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__}


def print_table(rows: Sequence[Dict[str, object]], cols: Sequence[str]) -> None:
    def fmt(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"  # not measured in this mode
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).rjust(w) for c, w in zip(cols, widths)))


def write_json(path: str, payload: Dict[str, object]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        jsonio.dump(payload, f, indent=1)
    print(f"wrote {path}")
