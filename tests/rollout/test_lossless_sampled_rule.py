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

from tests.rollout.test_lossless_sampling import SAMPLINGS, _setup, chi_square_p, exact_joint, sample_counts
from tlt_jax.core.errors import ConfigError
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout import SamplingParams, SpeculativeSpec, SpecStrategy, acceptance

TOKENS = 4
SAMPLINGS = dict(SAMPLINGS, **{"T1_k3": SamplingParams(temperature=1.0, top_k=3)})


@functools.lru_cache(maxsize=None)
def _adversarial():
    """A drafter whose q puts all its mass on the token the target gives least after PROMPT."""
    model, _, _ = _setup()
    first = exact_joint(model, SAMPLINGS["T1"], 1)
    return Drafter(model.cfg, nnx.Rngs(2), draft_vocab=np.asarray([int(np.argmin(first))]))


def _drafter(which):
    model, good, bad = _setup()
    return {"good": good, "bad": bad, "adversarial": _adversarial() if which == "adversarial" else None}[which]


@pytest.mark.lossless
@pytest.mark.parametrize("which,sampling,strategy", [
    ("good", "T1", "3_2_6"), ("good", "T0.7_p0.9", "3_2_6"), ("good", "T1", "chain-3"),
    ("good", "T1_k3", "chain-1"), ("bad", "T1", "3_2_6"), ("bad", "T0.7_p0.9", "chain-3"),
    ("adversarial", "T1", "3_2_6"), ("adversarial", "T0.7_p0.9", "chain-3")])
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
    """The point of the rule: at T = 1 the same drafter's drafts are accepted more often."""
    model, good, _ = _setup()
    params = SAMPLINGS["T1"]
    _, sampled = sample_counts(model, good, params, "chain-3", rule="sampled")
    _, target_only = sample_counts(model, good, params, "chain-3", rule="target_only")
    assert sampled > target_only, (sampled, target_only)


def _variant(**switches):
    def rule(key, logits, tree, sampling, max_depth):
        return acceptance.accept_sampled(key, logits, tree, sampling, max_depth, **switches)
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
