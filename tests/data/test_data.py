import json

import pytest

from tlt_jax.data.loader import load_examples, with_instruction
from tlt_jax.data.tasks import arithmetic_problems
from tlt_jax.core.errors import DataError


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_gsm8k_style_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
                        {"question": "Twelve hundred?", "answer": "so\n#### 1,200"}])
    ex = load_examples(str(path), answer_format="gsm8k")
    assert [(e.question, e.answer) for e in ex] == [("What is 2+3?", "5"), ("Twelve hundred?", "1200")]
    assert len(load_examples(str(path), answer_format="gsm8k", limit=1)) == 1


def test_math_style_parquet_with_boxed_solutions(tmp_path):
    import datasets

    path = str(tmp_path / "math.parquet")
    record = {"problem": "Half of one?", "solution": "It is \\boxed{\\frac{1}{2}}."}
    datasets.Dataset.from_list([record]).to_parquet(path)
    ex = load_examples(path, question_field="problem", answer_field="solution", answer_format="boxed")
    assert ex[0].answer == "\\frac{1}{2}" and ex[0].question == "Half of one?"


def test_eurus_style_nested_fields_and_chat_questions(tmp_path):
    path = tmp_path / "eurus.json"
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}],
             "reward_model": {"ground_truth": "2", "style": "rule"}}]
    path.write_text(json.dumps(rows))
    ex = load_examples(str(path), question_field="prompt", answer_field="reward_model.ground_truth")
    assert ex[0].question == "1+1?" and ex[0].answer == "2"


def test_wrong_fields_and_empty_data_are_clear_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{"q": "x", "a": "1"}])
    with pytest.raises(DataError, match=r"no field 'question'; its columns are \['a', 'q'\]"):
        load_examples(str(path))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="empty"):
        load_examples(str(empty))
    with pytest.raises(DataError, match="no data file"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="expects '#### <answer>'"):
        load_examples(str(path), question_field="q", answer_field="a", answer_format="gsm8k")


def test_generated_task_is_seeded_and_long_tailed():
    a = load_examples("arithmetic", limit=2000, seed=3)
    assert a == load_examples("arithmetic", limit=2000, seed=3)
    assert a != load_examples("arithmetic", limit=2000, seed=4)
    terms = [p.num_terms for p in arithmetic_problems(2000, seed=3)]
    mean = sum(terms) / len(terms)
    assert max(terms) >= 3 * mean  # a long tail: a few problems are many times the average
    assert sorted(terms)[len(terms) // 2] <= mean
    assert "\\boxed" in a[0].question


def test_instruction_is_appended_once():
    assert with_instruction("What is 1+1?", "Box it.") == "What is 1+1? Box it."
    assert with_instruction("What is 1+1? Box it.", "Box it.") == "What is 1+1? Box it."
    assert with_instruction("Give \\boxed{x}.", "Box it.") == "Give \\boxed{x}."
