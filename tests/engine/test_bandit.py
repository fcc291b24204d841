"""BEG-MAB: finds the best arm per bucket on a simulated reward table, explores, and is deterministic."""

import numpy as np
import pytest

from tlt_jax.engine.bandit import BucketBandit
from tlt_jax.engine.pool import ProgramPool
from tlt_jax.core.errors import ConfigError

# Mean committed tokens per second of each (bucket, arm): the best arm differs per bucket.
TABLE = {1: {"plain": 30.0, "chain-2": 36.0, "4_2_8": 50.0},
         4: {"plain": 60.0, "chain-2": 70.0, "4_2_8": 50.0},
         16: {"plain": 90.0, "chain-2": 70.0, "4_2_8": 40.0}}


def simulate(seed: int, pulls: int = 300, noise: float = 0.15):
    bandit = BucketBandit({b: list(arms) for b, arms in TABLE.items()}, epsilon=0.1, window=8, seed=seed)
    rng = np.random.default_rng(seed + 100)
    choices = []
    for i in range(pulls):
        b = list(TABLE)[i % len(TABLE)]
        arm = bandit.choose(b)
        choices.append((b, arm))
        # multiplicative noise and the odd very slow chunk (a shared machine): the median copes
        r = TABLE[b][arm] * rng.lognormal(0.0, noise) * (0.2 if rng.random() < 0.05 else 1.0)
        bandit.update(b, arm, r)
    return bandit, choices


def test_finds_best_arm_per_bucket():
    """Over 20 seeded runs: the best arm of each bucket is found in >= 90% of (run, bucket) pairs and gets
    most of the pulls on average; every arm is retried (it really explores)."""
    found, shares = [], []
    for seed in range(20):
        bandit, choices = simulate(seed)
        for b, arms in TABLE.items():
            best = max(arms, key=arms.get)
            found.append(bandit.best(b) == best)
            mine = [a for bb, a in choices if bb == b]
            shares.append(mine.count(best) / len(mine))
            assert all(mine.count(a) >= 2 for a in arms)
        assert bandit.explored > 0
    assert np.mean(found) >= 0.9, np.mean(found)
    assert np.mean(shares) > 0.65, np.mean(shares)


def test_random_choice_would_fail_the_same_check():
    """The control: an epsilon-1 bandit (pure exploration) does not pass the share check above."""
    bandit = BucketBandit({1: list(TABLE[1])}, epsilon=1.0, seed=0)
    choices = []
    for _ in range(300):
        choices.append(bandit.choose(1))
        bandit.update(1, choices[-1], TABLE[1][choices[-1]])
    assert bandit.best(1) == "4_2_8"  # it knows the best arm but does not play it
    assert choices.count("4_2_8") / len(choices) < 0.5


def test_deterministic_given_seed_and_rewards():
    _, a = simulate(5)
    _, b = simulate(5)
    assert a == b


def test_without_exploration_a_lucky_first_pull_sticks():
    """The control: with epsilon 0, an arm that looked good once and is never retried keeps winning."""
    bandit = BucketBandit({1: ["a", "b"]}, epsilon=0.0, window=4, seed=0, min_pulls=1)
    bandit.update(1, "a", 10.0)  # a good-looking first pull of the worse arm
    bandit.update(1, "b", 5.0)  # an unlucky first pull of the better arm
    for _ in range(50):
        arm = bandit.choose(1)
        bandit.update(1, arm, 8.0 if arm == "a" else 20.0)
    assert bandit.pulls[1]["b"] == 1 and bandit.best(1) == "a"
    explorer = BucketBandit({1: ["a", "b"]}, epsilon=0.2, window=4, seed=0, min_pulls=1)
    explorer.update(1, "a", 10.0)
    explorer.update(1, "b", 5.0)
    for _ in range(100):
        arm = explorer.choose(1)
        explorer.update(1, arm, 8.0 if arm == "a" else 20.0)
    assert explorer.best(1) == "b"


def test_bad_bandit_settings():
    with pytest.raises(ConfigError, match="epsilon"):
        BucketBandit({1: ["a"]}, epsilon=1.5)
    with pytest.raises(ConfigError, match="distinct"):
        BucketBandit({1: ["a", "a"]})
    with pytest.raises(KeyError, match="no arms"):
        BucketBandit({1: ["a"]}).choose(2)
    with pytest.raises(ConfigError):
        ProgramPool(0)


def test_program_pool_is_bounded_and_counts():
    pool = ProgramPool(2)
    built = []
    for key in ["a", "b", "a", "c", "b"]:
        pool.get(key, lambda k=key: built.append(k) or k.upper())
    assert built == ["a", "b", "c", "b"]  # 'a' was a hit; 'b' was evicted by 'c' (least recently used)
    st = pool.stats()
    assert (st["programs"], st["compiles"], st["evictions"], st["hits"]) == (2, 4, 2, 1)
    # derive() (a relocated copy) is tried before build() and counted apart; None from it means compile
    assert pool.get("d", lambda: "built", derive=lambda: "derived") == "derived"
    assert pool.get("e", lambda: "built", derive=lambda: None) == "built"
    st = pool.stats()
    assert (st["compiles"], st["relocations"]) == (5, 1) and pool.peek("e") == "built" and pool.peek("a") is None
    # a relocated copy is never offered as the source of another relocation; a later compile of its key is
    assert pool.peek("d") == "derived" and pool.compiled("d") is None and pool.compiled("e") == "built"
    pool.get("f", lambda: "F")  # evicts 'd'
    assert pool.get("d", lambda: "built d", derive=lambda: None) == "built d" and pool.compiled("d") == "built d"


@pytest.mark.parametrize("shape", [(1, 1), (2, 2)])
def test_relocated_program_runs_on_the_other_devices(shape, tmp_path):
    """A compiled program relocated to another sub-mesh: same results, on those devices, without a compile; the
    copy refuses arrays that live on the original devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from tlt_jax.engine.pool import relocate

    n = shape[0] * shape[1]
    src = Mesh(np.asarray(jax.devices()[:n]).reshape(shape), ("data", "tensor"))
    dst = Mesh(np.asarray(jax.devices()[n:2 * n]).reshape(shape), ("data", "tensor"))

    def f(x, w):
        for _ in range(3):
            x = jnp.tanh(x @ w)
        return x.sum(-1)

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 16), np.float32), rng.standard_normal((16, 16), np.float32)

    def put(mesh):
        return (jax.device_put(x, NamedSharding(mesh, P("data"))),
                jax.device_put(w, NamedSharding(mesh, P(None, "tensor"))))

    compiled = jax.jit(f).lower(*put(src)).compile()
    moved = relocate(compiled, list(src.devices.flat), list(dst.devices.flat))
    assert moved is not None
    out = moved(*put(dst))
    assert out.sharding.device_set == set(dst.devices.flat)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(compiled(*put(src))))
    with pytest.raises(ValueError, match="shardings"):
        moved(*put(src))
    assert relocate(compiled, list(src.devices.flat), list(dst.devices.flat)[:1] * (n + 1)) is None  # count differs
    # not with the persistent compilation cache (its executables break when serialized again; the resume tests'
    # runs share a cache and fail without this)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:  # (nothing is compiled while it is set)
        assert relocate(compiled, list(src.devices.flat), list(dst.devices.flat)) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
