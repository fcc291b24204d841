"""Verifiable rewards: math-verify on the last boxed answer, plus an optional format reward.

Rewards never raise: a garbage, empty or unfinished answer scores 0, and an error inside the verifier (or inside
a user-supplied reward function, see :func:`safe_rewards`) is counted, warned about once, and scores 0.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence

from tlt_jax.data.answers import last_boxed

MAX_BOXED_CHARS = 200  # longer "answers" are garbage, not worth a parser's time


class RewardOutput(NamedTuple):
    rewards: List[float]  # the training signal per answer
    correct: List[bool]  # the boxed answer verifies against the gold one
    formatted: List[bool]  # exactly the expected shape (a boxed answer, the answer finished)
    errors: int  # answers whose scoring raised (scored 0)


def _timeout() -> Optional[int]:
    # math-verify's timeouts use SIGALRM, which exists only in the main thread
    return 5 if threading.current_thread() is threading.main_thread() else None


def verify_answer(answer: str, gold: str) -> bool:
    """True when the last boxed expression of ``answer`` equals ``gold`` (math-verify)."""
    from math_verify import parse, verify

    boxed = last_boxed(answer)
    if not boxed or len(boxed) > MAX_BOXED_CHARS:
        return False
    t = _timeout()
    gold_p = parse(f"${gold}$", parsing_timeout=t)
    pred_p = parse(f"${boxed}$", parsing_timeout=t)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=t))


def math_rewards(answers: Sequence[str], golds: Sequence[str], finished: Sequence[bool], *,
                 format_weight: float = 0.0) -> RewardOutput:
    """Reward = 1 for a correct boxed answer (0 for an unfinished one) + ``format_weight`` x well-formed.

    ``finished``: the answer ended by a stop token (an answer cut at the length limit scores 0).
    """
    if not len(answers) == len(golds) == len(finished):
        raise ValueError(f"{len(answers)} answers, {len(golds)} gold answers, {len(finished)} finished flags")
    rewards, correct, formatted = [], [], []
    errors = 0
    for ans, gold, fin in zip(answers, golds, finished):
        ok = False
        if fin and ans:
            try:
                ok = verify_answer(ans, str(gold))
            except Exception:  # noqa: BLE001 - a verifier crash must not stop training
                errors += 1
        shape = bool(fin) and last_boxed(ans or "") is not None
        correct.append(ok)
        formatted.append(shape)
        rewards.append(float(ok) + format_weight * float(shape))
    return RewardOutput(rewards, correct, formatted, errors)


RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[bool]], RewardOutput]


def safe_rewards(fn: RewardFn, answers: Sequence[str], golds: Sequence[str], finished: Sequence[bool]
                 ) -> RewardOutput:
    """Calls a reward function; if it raises or returns the wrong number of rewards, every answer scores 0 and
    a warning says why (the run goes on). Non-finite rewards are replaced by 0."""
    n = len(answers)
    try:
        out = fn(answers, golds, finished)
        if not isinstance(out, RewardOutput):
            out = RewardOutput(list(out), [False] * n, [False] * n, 0)
        if len(out.rewards) != n:
            raise ValueError(f"returned {len(out.rewards)} rewards for {n} answers")
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"reward function {getattr(fn, '__name__', fn)!r} failed ({type(e).__name__}: {e}); "
                      f"this batch's {n} answers score 0", RuntimeWarning, stacklevel=2)
        return RewardOutput([0.0] * n, [False] * n, [False] * n, n)
    rewards = [float(r) if r == r and abs(float(r)) != float("inf") else 0.0 for r in out.rewards]
    bad = sum(1 for a, b in zip(rewards, out.rewards) if a != b)
    return RewardOutput(rewards, list(out.correct), list(out.formatted), out.errors + bad)
