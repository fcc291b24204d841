"""Speculative sampling reproduces the target distribution: chi-square against exact enumeration.

A tiny model with an 8-token vocabulary; the first three sampled tokens of 20,000 rows (the first comes from
the prefill, the next ones from draft/verify steps) are compared with the exact joint distribution computed by
enumerating all 512 continuations. The same test rejects a deliberately wrong acceptance rule.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import train_drafter
from tlt_jax.app.config import load_config
from tlt_jax.app.specs import model_config
from tlt_jax.models import Decoder
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout import RolloutSpec, SamplingParams, generate, sampling_logprobs
from tlt_jax.rollout import acceptance
from tlt_jax.rollout.speculative import SpeculativeSpec
from tlt_jax.rollout.tree import SpecStrategy

VOCAB = 8
PROMPT = [3, 1, 4]
N = 20_000
# KV cache slots: the 3-token prompt, 4 answer tokens and the largest tree verified here (9 nodes) fit in 16; the
# default (rounded up to 64) would make every one of the 20,000 rows attend over 4x as many slots
CACHE = 16
SAMPLINGS = {"T1": SamplingParams(temperature=1.0), "T0.7_p0.9": SamplingParams(temperature=0.7, top_p=0.9)}


@functools.lru_cache(maxsize=None)
def _setup():
    cfg = model_config(load_config("tiny", [f"model.arch.vocab_size={VOCAB}"]))
    model = Decoder(cfg, nnx.Rngs(11))
    rng = np.random.default_rng(0)
    prompts = [PROMPT] + [rng.integers(0, VOCAB, size=4).tolist() for _ in range(31)]
    good, metrics = train_drafter(model, prompts, steps=150, new_tokens=12, temperature=1.0)
    return model, good, Drafter(cfg, nnx.Rngs(5))


def exact_joint(model, sampling, n=3):
    """[8] * n probabilities of the first n sampled tokens after PROMPT."""
    conts = np.stack(np.meshgrid(*[np.arange(VOCAB)] * n, indexing="ij"), -1).reshape(-1, n)
    seqs = np.concatenate([np.broadcast_to(np.asarray(PROMPT), (len(conts), len(PROMPT))), conts], axis=1)
    t = seqs.shape[1]
    logits = model(jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), seqs.shape),
                   jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (len(seqs), t, t))).logits
    lp = np.asarray(sampling_logprobs(logits, sampling), np.float64)  # [8^n, t, V]
    p = len(PROMPT)
    rows = np.arange(len(seqs))
    joint = sum(lp[rows, p - 1 + i, seqs[:, p + i]] for i in range(n))
    return np.exp(joint).reshape((VOCAB,) * n)


def chi_square_p(counts, probs, min_expected=5.0):
    exp = probs.ravel() * counts.sum()
    obs = counts.ravel().astype(np.float64)
    small = exp < min_expected
    e = np.append(exp[~small], exp[small].sum())
    o = np.append(obs[~small], obs[small].sum())
    keep = e > 0
    stat = float((((o - e) ** 2)[keep] / e[keep]).sum())
    if (o[~keep] > 0).any():
        return 0.0  # a sample the target gives no mass
    dof = int(keep.sum()) - 1
    return float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0))


def sample_counts(model, drafter, sampling, strategy, rule="target_only", seed=0, n=3, rows=N):
    spec = RolloutSpec(max_new_tokens=n, sampling=sampling, chunk_steps=4)
    speculation = SpeculativeSpec(SpecStrategy.parse(strategy), rule=rule)
    out = generate(model, [PROMPT] * rows, spec, speculation=speculation, drafter=drafter, seed=seed,
                   cache_len=CACHE)
    toks = np.asarray(out.tokens)
    assert toks.shape == (rows, n)
    counts = np.zeros((VOCAB,) * n, np.int64)
    np.add.at(counts, tuple(toks[:, i] for i in range(n)), 1)
    return counts, out.accept_len


@pytest.mark.lossless
@pytest.mark.parametrize("which,sampling,strategy", [
    ("good", "T1", "3_2_6"), ("good", "T0.7_p0.9", "3_2_6"), ("bad", "T1", "3_2_6"),
    ("bad", "T0.7_p0.9", "3_2_6"), ("good", "T1", "chain-3"), ("bad", "T0.7_p0.9", "chain-3")])
def test_sampled_tokens_follow_target_distribution(which, sampling, strategy):
    model, good, bad = _setup()
    params = SAMPLINGS[sampling]
    counts, accept = sample_counts(model, good if which == "good" else bad, params, strategy)
    p = chi_square_p(counts, exact_joint(model, params))
    assert p > 1e-3, (which, sampling, strategy, p, accept)
    if which == "good":
        # Drafts are really accepted (an untrained drafter gets 1.10-1.13 here, the trained one 1.23-1.48).
        assert accept > 1.18, accept


def accept_without_residual(key, logits, tree, sampling, max_depth, draws=None):
    """A classic mistake: accept the first child with probability p(child), else draw the bonus from the full
    distribution (instead of the residual with the child removed): over-weights drafted tokens. Its draws all
    come from ``key`` (the rollout's position uniforms ``draws`` are not used)."""
    b = logits.shape[0]
    rows = jnp.arange(b)
    cur = jnp.zeros((b,), jnp.int32)
    going = jnp.ones((b,), bool)
    num = jnp.zeros((b,), jnp.int32)
    path, toks, lps = [cur], [], []
    for j in range(max_depth + 1):
        k1, k2 = jax.random.split(jax.random.fold_in(key, j))
        logp = sampling_logprobs(logits[rows, cur], sampling)
        is_child = tree.parents == cur[:, None]
        first = jnp.argmax(is_child, axis=1)
        has = is_child.any(axis=1) & (j < max_depth)
        child_tok = tree.tokens[rows, first]
        p_child = jnp.exp(logp[rows, child_tok])
        take = going & has & (jax.random.uniform(k1, (b,)) < p_child)
        y = jnp.where(take, child_tok, jax.random.categorical(k2, logp).astype(jnp.int32))
        toks.append(y)
        lps.append(logp[rows, y])
        if j == max_depth:
            break
        cur = jnp.where(take, first.astype(jnp.int32), cur)
        num = num + take.astype(jnp.int32)
        going = take
        path.append(jnp.where(take, cur, 0))
    return acceptance.Acceptance(jnp.stack(path, 1), jnp.stack(toks, 1), jnp.stack(lps, 1), num)


@pytest.mark.lossless
def test_wrong_acceptance_rule_is_rejected(monkeypatch):
    monkeypatch.setitem(acceptance.ACCEPTANCE_RULES, "no_residual", acceptance.Rule(accept_without_residual))
    model, good, _ = _setup()
    params = SAMPLINGS["T1"]
    counts, _ = sample_counts(model, good, params, "chain-3", rule="no_residual")
    assert chi_square_p(counts, exact_joint(model, params)) < 1e-6
