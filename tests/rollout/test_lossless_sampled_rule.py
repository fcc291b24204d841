"""The sampled rule (drafts drawn from the drafter's q, speculative sampling / recursive rejection sampling over
children drawn without replacement) reproduces the target distribution: chi-square against exact enumeration.

The tiny 8-token model of test_lossless_sampling; the first four sampled tokens of 20,000 rows (4,096 cells): the
first comes from the prefill, the next three from verify steps at depths 0, 1 and 2 (one step when every draft is
accepted, several after rejections; the depth-1 chain runs three steps). Good, bad and adversarial drafters
(q with mass on one token only, the one the target gives least), and deliberately wrong variants of the rule,
which the same test rejects.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.rollout.test_lossless_sampling import (CACHE, N, PROMPT, SAMPLINGS, VOCAB, _setup, chi_square_p,
                                                  exact_joint, sample_counts)
from tlt_jax.core.errors import ConfigError
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout import RolloutSpec, SamplingParams, SpeculativeSpec, SpecStrategy, acceptance, generate
from tlt_jax.rollout.suffix import GroupStore

TOKENS = 4
SAMPLINGS = dict(SAMPLINGS, **{"T1_k3": SamplingParams(temperature=1.0, top_k=3)})


@functools.lru_cache(maxsize=None)
def _adversarial():
    """A drafter whose q puts all its mass on the token the target gives least after PROMPT."""
    model, _, _ = _setup()
    first = exact_joint(model, SAMPLINGS["T1"], 1)
    return Drafter(model.cfg, nnx.Rngs(2), draft_vocab=np.asarray([int(np.argmin(first))]))


@functools.lru_cache(maxsize=None)
def _partial():
    """An untrained drafter over 5 of the 8 tokens: children drawn over its draft vocabulary, q zero elsewhere."""
    model, _, _ = _setup()
    return Drafter(model.cfg, nnx.Rngs(4), draft_vocab=np.asarray([0, 2, 3, 5, 6]))


def _drafter(which):
    model, good, bad = _setup()
    if which == "adversarial":
        return _adversarial()
    return _partial() if which == "partial" else {"good": good, "bad": bad}[which]


@pytest.mark.lossless
@pytest.mark.parametrize("which,sampling,strategy", [
    ("good", "T1", "3_2_6"), ("good", "T0.7_p0.9", "3_2_6"), ("good", "T1", "chain-3"),
    ("good", "T1_k3", "chain-1"), ("bad", "T1", "3_2_6"), ("bad", "T0.7_p0.9", "chain-3"),
    ("adversarial", "T1", "3_2_6"), ("adversarial", "T0.7_p0.9", "chain-3"), ("partial", "T0.7_p0.9", "3_2_6")])
def test_sampled_rule_follows_target_distribution(which, sampling, strategy):
    model, _, _ = _setup()
    params = SAMPLINGS[sampling]
    counts, accept = sample_counts(model, _drafter(which), params, strategy, rule="sampled", n=TOKENS)
    p = chi_square_p(counts, exact_joint(model, params, TOKENS))
    assert p > 1e-3, (which, sampling, strategy, p, accept)
    if which == "good":
        # drafts drawn from q are really accepted (the rule accepts with probability 1 - TV(p, q))
        assert accept > 1.18, accept


def test_sampled_rule_accepts_more_than_target_only_at_t1():
    """The point of the rule: at T = 1 the same drafter's drafts are accepted more often (a comparison of two
    means, not of distributions: 4,000 rows each)."""
    model, good, _ = _setup()
    params = SAMPLINGS["T1"]
    _, sampled = sample_counts(model, good, params, "chain-3", rule="sampled", rows=4000)
    _, target_only = sample_counts(model, good, params, "chain-3", rule="target_only", rows=4000)
    assert sampled > target_only + 0.05, (sampled, target_only)


def _variant(**switches):
    def rule(key, logits, tree, sampling, max_depth, draws=None):
        return acceptance.accept_sampled(key, logits, tree, sampling, max_depth, draws, **switches)
    return rule


def with_replacement(key, logq, k):
    """k independent draws from q (repeats allowed): a with-replacement draft verified as if without."""
    idx = jax.random.categorical(key, logq[..., None, :], axis=-1, shape=logq.shape[:-1] + (k,))
    return jnp.take_along_axis(logq, idx, axis=-1), idx.astype(jnp.int32)


@pytest.mark.lossless
@pytest.mark.parametrize("name,rule,which,strategy,tokens", [
    ("residual_not_renormalised", acceptance.Rule(_variant(renormalise_residual=False),
                                                  acceptance.without_replacement), "good", "3_3_9", TOKENS),
    ("q_ignored_in_ratio", acceptance.Rule(_variant(ratio_uses_q=False), acceptance.without_replacement),
     "good", "chain-3", TOKENS),
    # the order-sensitive mistakes show at the root's siblings, which a poor drafter (many rejections) reaches:
    # i.i.d. children verified as if drawn without replacement (a repeated child meets q = 0 after its twin was
    # removed, and the textbook rule, which never meets one, takes it for a fresh candidate) ...
    ("with_replacement_as_without", acceptance.Rule(_variant(skip_zero_mass=False), with_replacement),
     "bad", "1_3_4", 2),
    # ... and children drawn without replacement, verified as if with replacement (q not updated on a rejection)
    ("without_replacement_as_with", acceptance.Rule(_variant(remove_rejected=False), acceptance.without_replacement),
     "bad", "1_3_4", 2),
])
def test_wrong_variants_of_the_sampled_rule_are_rejected(monkeypatch, name, rule, which, strategy, tokens):
    monkeypatch.setitem(acceptance.ACCEPTANCE_RULES, name, rule)
    model, _, _ = _setup()
    params = SAMPLINGS["T1"]
    counts, _ = sample_counts(model, _drafter(which), params, strategy, rule=name, n=tokens)
    assert chi_square_p(counts, exact_joint(model, params, tokens)) < 1e-6, name


@pytest.mark.lossless
def test_sampled_rule_at_the_root_siblings_follows_target_distribution():
    """The exact rule in the setting that exposes the two order-sensitive mistakes above."""
    model, _, _ = _setup()
    params = SAMPLINGS["T1"]
    counts, _ = sample_counts(model, _drafter("bad"), params, "1_3_4", rule="sampled", n=2)
    assert chi_square_p(counts, exact_joint(model, params, 2)) > 1e-3


def test_the_sampled_rule_needs_a_drafter_distribution():
    with pytest.raises(ConfigError, match="drafts deterministically"):
        SpeculativeSpec(SpecStrategy.parse("chain-3"), proposer="ngram", rule="sampled")
    with pytest.raises(ConfigError, match="unknown acceptance rule 'nope'"):
        SpeculativeSpec(rule="nope")
    assert SpeculativeSpec.from_arm("4_2_8@sampled").rule == "sampled"
    assert SpeculativeSpec.from_arm("4_2_8@sampled").arm == "4_2_8@sampled"
    assert SpeculativeSpec.from_arm("plain").rule == "target_only"


@pytest.mark.lossless
def test_reusing_uniforms_across_depths_is_rejected(monkeypatch):
    """The uniforms of depth 1 reused at depths 2 and 3 (correlated accept decisions): the four-token test sees
    it (depths 1 and 2 are both inside the first verify step of a chain of 3). Measured p: 0 with the bad drafter
    at T = 1, 1e-13 with the good one at T = 0.7 / top-p 0.9, 3e-4 to 6e-4 with the good one at T = 1."""
    rule = acceptance.Rule(_variant(reuse_uniforms_after=1), acceptance.without_replacement)
    monkeypatch.setitem(acceptance.ACCEPTANCE_RULES, "reused_uniforms", rule)
    model, _, _ = _setup()
    params = SAMPLINGS["T1"]
    counts, _ = sample_counts(model, _drafter("bad"), params, "chain-3", rule="reused_uniforms", n=TOKENS)
    assert chi_square_p(counts, exact_joint(model, params, TOKENS)) < 1e-6


PAD = VOCAB  # the cell of a position after the answer ended


def _cells(tokens, n):
    """Counts over (VOCAB + 1)^n cells of answers of at most n tokens (PAD after the end)."""
    counts = np.zeros((VOCAB + 1,) * n, np.int64)
    padded = np.full((len(tokens), n), PAD, np.int64)
    for i, t in enumerate(tokens):
        padded[i, :len(t)] = t[:n]
    np.add.at(counts, tuple(padded[:, i] for i in range(n)), 1)
    return counts


def _exact_truncated(joint, stop, limit):
    """The exact distribution of answers that end at the first ``stop`` token or after ``limit`` tokens, from the
    joint of the first n tokens (the probabilities of the continuations after the end summed out)."""
    n = joint.ndim
    out = np.zeros((VOCAB + 1,) * n)
    for seq in np.ndindex(*joint.shape):
        cut = limit
        for i, t in enumerate(seq[:limit]):
            if t == stop:
                cut = i + 1
                break
        out[tuple(seq[:cut]) + (PAD,) * (n - cut)] += joint[seq]
    return out


@pytest.mark.lossless
@pytest.mark.parametrize("proposer,strategy,rule", [("eagle", "3_2_6", "sampled"), ("ngram", "chain-3", "target_only")])
def test_stop_tokens_and_row_limits_under_sampling(proposer, strategy, rule):
    """T = 0.7 with top-k 5: answers end at a stop token or at their own length limit (half the rows 2 tokens,
    half 4) exactly as the target's distribution says, with the sampled rule and with the n-gram proposer."""
    model, good, _ = _setup()
    params = SamplingParams(temperature=0.7, top_k=5)
    first = exact_joint(model, params, 1)
    stop = int(np.argsort(first)[-2])  # the second most likely first token: many answers stop early
    spec = RolloutSpec(max_new_tokens=TOKENS, sampling=params, chunk_steps=4, stop_tokens=(stop,))
    limits = [2, TOKENS] * (N // 2)
    out = generate(model, [PROMPT] * N, spec, max_new=limits, drafter=good if proposer == "eagle" else None,
                   cache_len=CACHE,
                   speculation=SpeculativeSpec(SpecStrategy.parse(strategy), proposer=proposer, rule=rule))
    joint = exact_joint(model, params, TOKENS)
    for limit in (2, TOKENS):
        rows = [t for t, lim in zip(out.tokens, limits) if lim == limit]
        p = chi_square_p(_cells(rows, TOKENS), _exact_truncated(joint, stop, limit))
        assert p > 1e-3, (proposer, limit, p)
    reasons = set(out.finish_reasons)
    assert reasons == {"stop", "length"}, reasons


@pytest.mark.lossless
@pytest.mark.parametrize("proposer,strategy,rule,sampling", [
    ("group", "chain-3", "target_only", "T1"), ("hybrid", "3_2_6", "sampled", "T0.7_p0.9")])
def test_group_and_hybrid_follow_target_distribution(proposer, strategy, rule, sampling):
    """The group proposer drafts from the siblings (every row has the same prompt) and from the answers of an
    earlier rollout of the prompt (a store filled by a first rollout); the hybrid mixes those drafts (target-only)
    with the drafter's sampled ones. Both reproduce the target distribution, and the stored answers are drafted."""
    model, good, _ = _setup()
    params = SAMPLINGS[sampling]
    spec = RolloutSpec(max_new_tokens=TOKENS, sampling=params, chunk_steps=4)
    speculation = SpeculativeSpec(SpecStrategy.parse(strategy), proposer=proposer, rule=rule, hybrid_min=2)
    store = GroupStore(per_prompt=4)
    drafter = good if proposer == "hybrid" else None
    generate(model, [PROMPT] * 16, spec, speculation=speculation, drafter=drafter, seed=1, store=store, cache_len=CACHE,
             group_sources=8)  # the earlier rollout: 4 answers are kept
    out = generate(model, [PROMPT] * N, spec, speculation=speculation, drafter=drafter, seed=2, store=store,
                   cache_len=CACHE, group_sources=8)
    toks = np.asarray(out.tokens)
    counts = np.zeros((VOCAB,) * TOKENS, np.int64)
    np.add.at(counts, tuple(toks[:, i] for i in range(TOKENS)), 1)
    p = chi_square_p(counts, exact_joint(model, params, TOKENS))
    assert p > 1e-3, (proposer, p, out.accept_len)
    assert out.accept_len > 1.1, out.accept_len
