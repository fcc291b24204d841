"""A generated, verifiable arithmetic task with long-tailed answer lengths (the offline default data).

Each problem is a chain of integer operations whose number of terms follows a geometric law, so most
worked answers are short and a few are long. Problems are a pure function of (seed, index).
"""

from __future__ import annotations

from typing import List, NamedTuple

import numpy as np

from tlt_jax.core.seeds import numpy_stream

INSTRUCTION = "End your answer with the result in the form \\boxed{result}."


class Problem(NamedTuple):
    question: str
    answer: int
    num_terms: int


def make_problem(rng: np.random.Generator, mean_terms: float = 3.0, max_terms: int = 12) -> Problem:
    n = int(min(max_terms, 1 + rng.geometric(1.0 / max(1.0, mean_terms - 1.0))))
    value = int(rng.integers(2, 60))
    text = str(value)
    for _ in range(n - 1):
        op = rng.choice(["+", "-", "*"], p=[0.45, 0.35, 0.2])
        x = int(rng.integers(2, 13 if op == "*" else 60))
        text += f" {op} {x}"
        value = value + x if op == "+" else value - x if op == "-" else value * x
    return Problem(f"Compute {text}, working from left to right. {INSTRUCTION}", value, n)


def arithmetic_problems(n: int, seed: int = 0, mean_terms: float = 3.0) -> List[Problem]:
    """``n`` problems; the same (n, seed) always gives the same list."""
    rng = numpy_stream(seed, "arithmetic")
    return [make_problem(rng, mean_terms) for _ in range(n)]
