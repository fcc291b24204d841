"""Training data: the generated arithmetic task (offline default) or a `datasets` source (hub or local files).

    source = 'arithmetic'                       the generated task (seeded, long-tailed answer lengths)
    source = 'openai/gsm8k' (+ subset 'main')   a hub dataset (needs the network or a local hub cache)
    source = '/path/train.jsonl' | '.json' | '.parquet'   local files

``question_field`` / ``answer_field`` name the columns; dotted names reach into nested records
('reward_model.ground_truth'); a question that is a list of chat messages (Eurus-2-RL style) contributes its
last user message. ``answer_format`` turns the answer column into the gold answer: 'raw' (as is), 'gsm8k' (the
part after '####'), 'boxed' (the last \\boxed{...} of a worked solution, MATH style).
"""

from __future__ import annotations

import os
from typing import Any, List, NamedTuple, Sequence

from tlt_jax.core.errors import DataError
from tlt_jax.data.answers import last_boxed
from tlt_jax.data.tasks import arithmetic_problems

ANSWER_FORMATS = ("raw", "gsm8k", "boxed")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class Example(NamedTuple):
    question: str
    answer: str  # the gold answer, as math-verify should read it


def _get(record: Any, dotted: str) -> Any:
    cur = record
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(dotted)
    return cur


def _question_text(q: Any) -> str:
    if isinstance(q, str):
        return q
    if isinstance(q, Sequence) and q and all(isinstance(m, dict) for m in q):
        users = [m.get("content", "") for m in q if m.get("role") == "user"]
        if users:
            return str(users[-1])
    raise DataError(f"a question must be a string or a list of chat messages with a user turn, got {q!r:.120}")


def gold_answer(raw: Any, answer_format: str) -> str:
    text = str(raw).strip()
    if answer_format == "gsm8k":
        if "####" not in text:
            raise DataError(f"answer_format 'gsm8k' expects '#### <answer>', got {text[:120]!r}")
        text = text.split("####")[-1].strip().replace(",", "")
    elif answer_format == "boxed":
        boxed = last_boxed(text)
        if boxed is None:
            raise DataError(f"answer_format 'boxed' expects a \\boxed{{...}} answer, got {text[-120:]!r}")
        text = boxed
    return text


def _load_dataset(source: str, subset: str, split: str):
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if ext in LOCAL_FORMATS:
        if not os.path.exists(source):
            raise DataError(f"no data file at {source}")
        try:
            return datasets.load_dataset(LOCAL_FORMATS[ext], data_files={split: source}, split=split)
        except Exception as e:  # noqa: BLE001
            if "corresponds to no data" in str(e) or os.path.getsize(source) == 0:
                raise DataError(f"dataset {source!r} is empty") from None
            raise DataError(f"could not read {source!r} as {LOCAL_FORMATS[ext]}: {type(e).__name__}: {e}") from None
    if os.path.isdir(source):
        return datasets.load_dataset(source, split=split)
    try:
        return datasets.load_dataset(source, subset or None, split=split)
    except Exception as e:  # noqa: BLE001 - name the source whatever the loader's error type
        raise DataError(f"could not load dataset {source!r} (subset {subset!r}, split {split!r}): "
                        f"{type(e).__name__}: {e}") from None


def load_examples(source: str, *, subset: str = "", split: str = "train", question_field: str = "question",
                  answer_field: str = "answer", answer_format: str = "raw", limit: int = 0, seed: int = 0,
                  mean_terms: float = 3.0) -> List[Example]:
    """Examples from ``source`` (see the module docstring). ``limit`` > 0 keeps the first ``limit``."""
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if source == "arithmetic":
        n = limit if limit > 0 else 10_000
        return [Example(p.question, str(p.answer)) for p in arithmetic_problems(n, seed, mean_terms)]
    ds = _load_dataset(source, subset, split)
    if len(ds) == 0:
        raise DataError(f"dataset {source!r} (split {split!r}) is empty")
    first = ds[0]
    for field in (question_field, answer_field):
        try:
            _get(first, field)
        except KeyError:
            raise DataError(f"dataset {source!r} has no field {field!r}; its columns are "
                            f"{sorted(ds.column_names)}") from None
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    out = []
    for i in range(n):
        rec = ds[i]
        out.append(Example(_question_text(_get(rec, question_field)), gold_answer(_get(rec, answer_field),
                                                                                   answer_format)))
    return out


def with_instruction(question: str, instruction: str) -> str:
    """The question with the answer-format instruction appended, unless it already holds the instruction or
    already asks for a \\boxed answer."""
    if not instruction or instruction in question or "\\boxed" in question:
        return question
    return f"{question.rstrip()} {instruction}"
