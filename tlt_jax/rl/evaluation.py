"""Held-out evaluation: sampled answers per problem and a greedy pass, scored by the run's reward function.

    result = evaluate(sampled, greedy, params, prompts, golds, questions, settings=..., reward_fn=..., decode=...)
    result.summary   # greedy_accuracy, mean@n, pass@k, format_rate, answer-length percentiles, ...
    result.records   # one dict per problem (its answers, their lengths, correctness and pass@k)

``sampled`` and ``greedy`` are :class:`~tlt_jax.rollout.host.Rollout` objects (the run's own rollout path built
at the evaluation temperature and at temperature 0), so an evaluation with speculation samples from the same
distribution as one without. Every problem gets ``settings.samples`` rows; rows are cut into batches of
``settings.batch_size`` (the last one padded with copies of its last row, whose answers are dropped) and batch
``j`` is sampled with seed ``stream_seed(settings.seed, 'eval', j)``, so two evaluations of the same policy on
the same problems give the same answers, and evaluations of different steps differ by the policy alone.

pass@k is the unbiased estimator of Chen et al. (2021): with ``c`` of ``n`` samples correct,
``1 - C(n - c, k) / C(n, k)`` per problem (the chance that ``k`` of the ``n`` samples drawn without replacement
hold a correct one), averaged over problems; ``mean@n`` is the mean accuracy of the samples (= pass@1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from fractions import Fraction
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from tlt_jax.core.errors import InputError
from tlt_jax.core.jsonio import json_line
from tlt_jax.core.seeds import stream_seed
from tlt_jax.rl.rewards import RewardOutput, safe_rewards
from tlt_jax.rl.step import percentiles
from tlt_jax.rollout.host import DrafterInput, Rollout, RolloutOutput

EVAL_DIR = "eval"  # in a work dir: eval/<step>.jsonl (per problem) and eval/<step>.summary.json


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that ``k`` of ``n`` samples, ``c`` of them correct, drawn without
    replacement, hold at least one correct (exact integer binomials, rounded once to a float)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    samples: int = 4  # sampled answers per problem
    ks: Tuple[int, ...] = (1, 4)  # pass@k for these k (each <= samples)
    greedy: bool = True  # also one greedy answer per problem
    batch_size: int = 16  # rows per rollout call
    seed: int = 0  # the sampling streams' seed

    def __post_init__(self):
        if self.samples < 1 or self.batch_size < 1:
            raise InputError(f"evaluation needs samples >= 1 and batch_size >= 1, got {self.samples}, "
                             f"{self.batch_size}")
        bad = [k for k in self.ks if not 1 <= int(k) <= self.samples]
        if not self.ks or bad:
            raise InputError(f"pass@k needs 1 <= k <= samples ({self.samples}) for every k, got {list(self.ks)}")


class EvalResult(NamedTuple):
    summary: Dict[str, Any]  # one row: see the module docstring
    records: List[Dict[str, Any]]  # one per problem


def _answers(rollout: Rollout, params, prompts: Sequence[Sequence[int]], *, batch_size: int, seed: int,
             stream: str, drafter: Optional[DrafterInput], progress: Optional[Callable[[int], None]]
             ) -> Tuple[List[List[int]], List[str], List[int], List[int]]:
    """Answers to ``prompts`` in batches of ``batch_size`` rows: (tokens, finish reasons, lengths, verifies per
    row or -1 for plain decoding)."""
    tokens, finish, lengths, verifies = [], [], [], []
    for j, start in enumerate(range(0, len(prompts), batch_size)):
        rows = list(prompts[start:start + batch_size])
        real = len(rows)
        rows += [rows[-1]] * (batch_size - real)
        out: RolloutOutput = rollout.generate(params, rows, seed=stream_seed(seed, stream, j), drafter=drafter)
        tokens += [list(t) for t in out.tokens[:real]]
        finish += list(out.finish_reasons[:real])
        lengths += [int(x) for x in np.asarray(out.lengths)[:real]]
        verifies += ([int(v) for v in np.asarray(out.verifies)[:real]] if out.verifies is not None
                     else [-1] * real)
        if progress is not None:
            progress(real)
    return tokens, finish, lengths, verifies


def _score(reward_fn, texts: List[str], golds: List[str], finish: List[str]) -> RewardOutput:
    return safe_rewards(reward_fn, texts, golds, [r == "stop" for r in finish])


def evaluate(sampled: Rollout, greedy: Optional[Rollout], params, prompts: Sequence[Sequence[int]],
             golds: Sequence[str], questions: Sequence[str], *, settings: EvalSettings, reward_fn: Callable,
             decode: Callable[[List[int]], str], drafter: Optional[DrafterInput] = None,
             progress: Optional[Callable[[int], None]] = None) -> EvalResult:
    """Scores the policy ``params`` on the problems (``prompts`` token lists with their ``golds`` and
    ``questions`` texts): ``settings.samples`` answers each from ``sampled``, one from ``greedy`` (None: no
    greedy pass). ``progress`` is called with the number of rows each rollout call finished."""
    if not (len(prompts) == len(golds) == len(questions)) or not prompts:
        raise InputError(f"evaluation needs as many prompts, gold answers and questions (and at least one): got "
                         f"{len(prompts)}, {len(golds)}, {len(questions)}")
    n, p = settings.samples, len(prompts)
    t0 = time.perf_counter()
    rows = [prompts[i] for i in range(p) for _ in range(n)]
    toks, finish, lengths, verifies = _answers(sampled, params, rows, batch_size=settings.batch_size,
                                                       seed=settings.seed, stream="eval", drafter=drafter,
                                                       progress=progress)
    texts = [decode(t) for t in toks]
    scores = _score(reward_fn, texts, [golds[i] for i in range(p) for _ in range(n)], finish)
    correct = np.asarray(scores.correct, bool).reshape(p, n)
    formatted = np.asarray(scores.formatted, bool).reshape(p, n)
    summary: Dict[str, Any] = {"problems": p, "samples": n}
    g_texts = g_finish = g_lengths = None
    if greedy is not None:
        g_toks, g_finish, g_lengths, _ = _answers(greedy, params, list(prompts), batch_size=settings.batch_size,
                                                     seed=settings.seed, stream="eval_greedy", drafter=drafter,
                                                     progress=progress)
        g_texts = [decode(t) for t in g_toks]
        g_scores = _score(reward_fn, g_texts, list(golds), g_finish)
        summary["greedy_accuracy"] = float(np.mean(g_scores.correct))
        summary["greedy_format_rate"] = float(np.mean(g_scores.formatted))
    per_k = {k: [pass_at_k(n, int(c), k) for c in correct.sum(axis=1)] for k in settings.ks}
    summary[f"mean@{n}"] = float(correct.mean())
    for k in settings.ks:
        summary[f"pass@{k}"] = float(np.mean(per_k[k]))
    summary["format_rate"] = float(formatted.mean())
    summary["truncated"] = float(np.mean([r == "length" for r in finish]))
    summary.update(percentiles(lengths))
    summary["tokens"] = int(sum(lengths))
    spec_rows = [(ln, v) for ln, v in zip(lengths, verifies) if v >= 0]
    if spec_rows:  # committed tokens per target forward over the sampled answers
        summary["accept_len"] = float(sum(ln for ln, _ in spec_rows) / max(1, sum(v for _, v in spec_rows)))
    summary["reward_errors"] = int(scores.errors)
    summary["time_s"] = time.perf_counter() - t0
    records = []
    for i in range(p):
        rec = {"index": i, "question": questions[i], "gold": golds[i], "correct": int(correct[i].sum()),
               "pass": {str(k): per_k[k][i] for k in settings.ks},
               "samples": [{"answer": texts[i * n + s], "correct": bool(correct[i, s]),
                            "formatted": bool(formatted[i, s]), "length": lengths[i * n + s],
                            "finish": finish[i * n + s]} for s in range(n)]}
        if g_texts is not None:
            rec["greedy"] = {"answer": g_texts[i], "correct": bool(g_scores.correct[i]),
                             "formatted": bool(g_scores.formatted[i]), "length": g_lengths[i], "finish": g_finish[i]}
        records.append(rec)
    return EvalResult(summary, records)


# ------------------------------------------------------------------------------------------------ files


def write_result(workdir: str, step: int, result: EvalResult) -> str:
    """``<workdir>/eval/<step>.jsonl`` (one record per problem) and ``<step>.summary.json`` (the summary with
    its step); returns the records' path. Each file is written under a temporary name and renamed."""
    directory = os.path.join(workdir, EVAL_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{step}.jsonl")
    _write_atomic(path, "".join(json_line(r) for r in result.records))
    _write_atomic(os.path.join(directory, f"{step}.summary.json"), json_line({"step": int(step), **result.summary}))
    return path


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_summaries(workdir: str) -> List[Dict[str, Any]]:
    """The summaries in ``<workdir>/eval``, by step."""
    directory = os.path.join(workdir, EVAL_DIR)
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        if name.endswith(".summary.json") and name.split(".")[0].isdigit():
            with open(os.path.join(directory, name)) as f:
                out.append(json.loads(f.read()))
    return sorted(out, key=lambda s: s["step"])


def drop_after(workdir: str, step: int) -> None:
    """Removes the evaluation files of steps after ``step`` (a resumed run redoes them)."""
    directory = os.path.join(workdir, EVAL_DIR)
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        head = name.split(".")[0]
        if head.isdigit() and int(head) > step:
            os.remove(os.path.join(directory, name))
