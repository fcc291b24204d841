import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlt_jax.core.errors import ConfigError
from tlt_jax.rollout.sampling import SamplingParams, inverse_cdf, sample, sampling_logprobs


def sorted_top_p_reference(logits, temperature, top_p):
    """Sort-based nucleus: the smallest prefix of sorted tokens with mass >= top_p."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    k = int(np.searchsorted(cum, top_p) + 1)
    keep = np.zeros_like(p, bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_sorted_reference(top_p):
    rng = np.random.RandomState(0)
    logits = rng.randn(16, 1000).astype(np.float32) * 3
    lp = np.asarray(sampling_logprobs(jnp.asarray(logits), SamplingParams(0.7, 0, top_p)))
    for i in range(16):
        keep = sorted_top_p_reference(logits[i].astype(np.float64), 0.7, top_p)
        got = np.isfinite(lp[i])
        # identical sets except possibly a token whose cumulative mass sits within float error of top_p
        assert np.sum(got != keep) <= 1
        assert got.sum() >= 1
        np.testing.assert_allclose(np.exp(lp[i][got]).sum(), 1.0, rtol=1e-5)


def test_top_k_and_temperature():
    logits = jnp.asarray(np.random.RandomState(1).randn(4, 50).astype(np.float32))
    lp = np.asarray(sampling_logprobs(logits, SamplingParams(2.0, 5, 1.0)))
    assert (np.isfinite(lp).sum(-1) == 5).all()
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    for i in range(4):
        assert set(np.nonzero(np.isfinite(lp[i]))[0]) == set(top5[i])
        ref = np.asarray(logits[i])[top5[i]] / 2.0
        ref = ref - np.log(np.exp(ref - ref.max()).sum()) - ref.max()
        np.testing.assert_allclose(lp[i][top5[i]], ref, atol=1e-5)


def test_greedy_is_argmax_with_model_logprob():
    logits = jnp.asarray(np.random.RandomState(2).randn(3, 20).astype(np.float32))
    tok, lp = sample(jax.random.PRNGKey(0), logits, SamplingParams())
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.asarray(logits), -1))
    np.testing.assert_allclose(np.asarray(lp), np.asarray(jax.nn.log_softmax(logits)).max(-1), atol=1e-6)


def test_sampling_frequencies_follow_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    params = SamplingParams(1.0, 0, 0.8)  # nucleus keeps {0, 1} (0.8 mass)
    toks = jax.vmap(lambda k: sample(k, logits, params)[0][0])(keys)
    freq = np.bincount(np.asarray(toks), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)


def test_inverse_cdf_draws_never_hit_zero_probability_tokens():
    """Zero-probability tokens inside and at the end of the vocabulary are never drawn; the rest at their rate."""
    p = np.asarray([0.0, 0.2, 0.0, 0.5, 0.3, 0.0, 0.0])
    logp = jnp.log(jnp.asarray(p, jnp.float32))[None]
    keys = jax.random.split(jax.random.PRNGKey(1), 40000)
    toks = np.asarray(jax.vmap(lambda k: inverse_cdf(k, logp)[0])(keys))
    freq = np.bincount(toks, minlength=7) / len(toks)
    np.testing.assert_allclose(freq, p, atol=0.01)
    assert freq[[0, 2, 5, 6]].sum() == 0


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2)])
def test_bad_sampling_params(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)
