"""The unbiased pass@k estimator against brute force, and the evaluation settings' checks."""

import itertools

import numpy as np
import pytest

from tlt_jax.core.errors import InputError
from tlt_jax.rl.evaluation import EvalSettings, pass_at_k


def brute_force(n, c, k):
    """The share of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_of_every_subset():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_one_correct_of_four():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 2) == 0.5
    assert pass_at_k(4, 0, 4) == 0.0
    # averaged over problems, as the evaluation reports it (not best-of-k over one fixed sample)
    assert np.mean([pass_at_k(4, c, 2) for c in (0, 1, 4)]) == pytest.approx((0 + 0.5 + 1) / 3)


def test_pass_at_k_is_exact_for_large_sample_counts():
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200, abs=1e-15)
    assert pass_at_k(1000, 1, 999) == pytest.approx(0.999, abs=1e-15)


def test_bad_k_and_counts_are_clear_errors():
    with pytest.raises(InputError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(InputError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(InputError, match=r"1 <= k <= samples \(4\)"):
        EvalSettings(samples=4, ks=(1, 8))
