import warnings

import pytest

from tests.rl import reward_fns
from tlt_jax.data.answers import last_boxed
from tlt_jax.rl.rewards import math_rewards, safe_rewards


def test_last_boxed_takes_the_last_balanced_box():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed {7}") == "7"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{unclosed") is None


def test_math_rewards_correct_wrong_unfinished_and_garbage():
    answers = ["so the answer is \\boxed{42}", "\\boxed{41}", "\\boxed{42}", "", "\\boxed{\\frac{{{}",
               "x" * 100_000, "\\boxed{" + "9" * 5000 + "}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}"]
    golds = ["42", "42", "42", "42", "42", "42", "42", "1/2", "0.5"]
    finished = [True, True, False, True, True, False, True, True, True]
    out = math_rewards(answers, golds, finished, format_weight=0.1)
    assert out.correct == [True, False, False, False, False, False, False, True, True]
    assert out.formatted == [True, True, False, False, False, False, True, True, True]
    assert out.rewards == pytest.approx([1.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.1, 1.1, 1.1])
    with pytest.raises(ValueError, match="3 answers, 2 gold"):
        math_rewards(["a", "b", "c"], ["1", "2"], [True] * 3)


def test_a_reward_function_that_raises_scores_zero_with_a_warning():
    with pytest.warns(RuntimeWarning, match="always fails"):
        out = safe_rewards(reward_fns.broken, ["a", "b"], ["1", "2"], [True, True])
    assert out.rewards == [0.0, 0.0] and out.errors == 2


def test_non_finite_and_miscounted_rewards_are_contained():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = safe_rewards(reward_fns.nan_rewards, ["a", "b"], ["1", "2"], [True, True])
    assert out.rewards == [0.0, 0.0] and out.errors == 2
    with pytest.warns(RuntimeWarning, match="returned 1 rewards for 2"):
        safe_rewards(lambda a, g, f: [1.0], ["a", "b"], ["1", "2"], [True, True])
