"""Speculative rollout: strategies, tree shapes, the n-gram proposer, bad input, and greedy losslessness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import train_drafter
from tlt_jax.app.config import load_config
from tlt_jax.app.specs import model_config
from tlt_jax.core.errors import ConfigError, InputError
from tlt_jax.models import Decoder
from tlt_jax.models.drafter import Drafter
from tlt_jax.rollout import RolloutSpec, generate
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.suffix import propose_ngram
from tlt_jax.rollout.speculative import SpeculativeSpec, grow_tree
from tlt_jax.rollout.tree import SpecStrategy, ancestor_mask


def test_strategy_parse_and_limits():
    s = SpecStrategy.parse("chain-4")
    assert (s.depth, s.top_k, s.num_verify, s.name) == (4, 1, 5, "chain-4")
    t = SpecStrategy.parse("6_4_16")
    assert (t.depth, t.top_k, t.num_verify, t.name, t.max_nodes) == (6, 4, 16, "6_4_16", 4 + 5 * 16)
    with pytest.raises(ConfigError, match="at most 3"):
        SpecStrategy.parse("3_1_5")  # a chain of depth 3 has 3 draft nodes
    with pytest.raises(ConfigError, match="at most 84"):
        SpecStrategy(depth=6, top_k=4, num_verify=86)
    for bad in ("chain-0", "tree", "6-4-16", "0_2_3"):
        with pytest.raises(ConfigError):
            SpecStrategy.parse(bad)
    with pytest.raises(ConfigError, match="chains only"):
        SpeculativeSpec(SpecStrategy.parse("4_2_8"), proposer="ngram")
    with pytest.raises(ConfigError, match="proposer"):
        SpeculativeSpec(proposer="medusa")
    with pytest.raises(ValueError, match="acceptance"):
        SpeculativeSpec(rule="nope")


def test_config_speculative_section_checked():
    with pytest.raises(ConfigError, match="at most"):
        load_config("tiny", ["speculative.strategy=2_2_9"])
    with pytest.raises(ConfigError, match="chains only"):
        load_config("tiny", ["speculative.proposer=ngram", "speculative.strategy=6_4_16"])
    assert load_config("tiny", ["speculative.strategy=8_4_32"]).speculative.strategy == "8_4_32"


def test_ngram_proposes_continuation_of_latest_match():
    hist = np.zeros((3, 16), np.int32)
    hist[0, :10] = [5, 6, 7, 8, 1, 5, 6, 9, 4, 5]  # last "5": latest earlier "5" at 5 -> 6, 9, 4
    hist[1, :8] = [1, 2, 3, 4, 1, 2, 3, 7]  # "3" seen at 2 -> 4 1 2
    hist[2, :4] = [9, 8, 7, 6]  # no match: the root repeated
    lengths = jnp.asarray([10, 7, 4])  # row 1: last token is the 3 at position 6
    out = np.asarray(propose_ngram(jnp.asarray(hist), lengths, depth=3, max_n=3, min_n=1))
    np.testing.assert_array_equal(out[0], [6, 9, 4])
    np.testing.assert_array_equal(out[1], [4, 1, 2])  # the 3-gram "1 2 3" matches at 0..2
    np.testing.assert_array_equal(out[2], [6, 6, 6])
    # a continuation that runs into the present stops at the last valid token (then pads with the root)
    hist2 = np.zeros((1, 8), np.int32)
    hist2[0, :5] = [3, 4, 3, 4, 3]
    out2 = np.asarray(propose_ngram(jnp.asarray(hist2), jnp.asarray([5]), depth=4))
    np.testing.assert_array_equal(out2[0], [4, 3, 3, 3])


def _tiny(dtype="float32", vocab=None, seed=0):
    over = [f"model.dtype={dtype}", f"model.param_dtype={dtype}"]
    if vocab:
        over.append(f"model.arch.vocab_size={vocab}")
    cfg = model_config(load_config("tiny", over))
    return Decoder(cfg, nnx.Rngs(seed))


@pytest.mark.parametrize("strategy", ["chain-3", "3_3_9", "4_2_7"])
def test_grow_tree_is_a_valid_tree(strategy):
    from tlt_jax.models.drafter import init_drafter_cache

    model = _tiny()
    strat = SpecStrategy.parse(strategy)
    drafter = Drafter(model.cfg, nnx.Rngs(3))
    b = 3
    dcache = init_drafter_cache(model.cfg, b, 32).replace(lengths=jnp.asarray([0, 5, 9], jnp.int32))
    hidden = jax.random.normal(jax.random.PRNGKey(0), (b, model.cfg.hidden_size))
    tree = grow_tree(drafter, model, drafter.head_weight(model), dcache, hidden, jnp.asarray([1, 2, 3]), strat)
    toks, par, dep = (np.asarray(x) for x in (tree.tokens, tree.parents, tree.depth))
    assert toks.shape == (b, strat.num_verify)
    for r in range(b):
        assert par[r, 0] == -1 and dep[r, 0] == 0
        for i in range(1, strat.num_verify):
            assert 0 <= par[r, i] < i  # parents come first
            assert dep[r, i] == dep[r, par[r, i]] + 1 <= strat.depth
        for p in set(par[r, 1:]):  # siblings carry distinct tokens
            sib = toks[r, 1:][par[r, 1:] == p]
            assert len(set(sib.tolist())) == len(sib)
    mask = np.asarray(ancestor_mask(tree.parents, strat.depth))
    for r in range(b):
        for i in range(strat.num_verify):
            anc, j = {i}, i
            while par[r, j] >= 0:
                j = par[r, j]
                anc.add(j)
            assert set(np.nonzero(mask[r, i])[0].tolist()) == anc


def test_bad_input_errors(tmp_path):
    model = _tiny()
    spec = RolloutSpec(max_new_tokens=8)
    prompts = [[1, 2, 3, 4, 5, 6]]
    with pytest.raises(InputError, match="does not fit a KV cache"):
        generate(model, prompts, spec, speculation=SpeculativeSpec(SpecStrategy.parse("8_4_32")),
                 drafter=Drafter(model.cfg, nnx.Rngs(0)), cache_len=32)
    with pytest.raises(InputError, match="needs a drafter"):
        generate(model, prompts, spec, speculation=SpeculativeSpec())
    other = Decoder(model.cfg.replace(hidden_size=32, intermediate_size=64), nnx.Rngs(0))
    with pytest.raises(InputError, match="another target"):
        generate(model, prompts, spec, speculation=SpeculativeSpec(), drafter=Drafter(other.cfg, nnx.Rngs(0)))


def _prompts(vocab, sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in sizes]


@pytest.mark.lossless
def test_greedy_speculative_equals_plain_float64():
    """Float64: greedy speculation (a chain and a tree with the warmed drafter, a chain with a bad one, n-gram,
    group and hybrid proposers, and the engine's plain arm) == plain greedy decoding, including rows that stop on
    a stop token or their own length limit inside an accepted run. Rows 1 and 4 share a prompt (a group: each
    drafts from the other)."""
    with jax.enable_x64(True):
        model = _tiny("float64", seed=1)
        prompts = _prompts(model.cfg.vocab_size, (3, 7, 12, 5))
        prompts.append(prompts[1])
        warm, metrics = train_drafter(model, _prompts(model.cfg.vocab_size, [6] * 16, seed=5) + prompts,
                                      steps=120, new_tokens=40)
        bad = Drafter(model.cfg, nnx.Rngs(7))
        base = RolloutSpec(max_new_tokens=40, chunk_steps=4)
        plain = generate(model, prompts, base)
        # stop tokens taken from the middle of the plain answers, and per-row limits
        stops = tuple({int(plain.tokens[0][9]), int(plain.tokens[2][17])})
        limits = [40, 13, 29, 6, 40]
        spec = RolloutSpec(max_new_tokens=40, chunk_steps=4, stop_tokens=stops)
        ref = generate(model, prompts, spec, max_new=limits)
        # every proposer with the stop tokens and row limits
        runs = [("warm", warm, "eagle", "target_only"), ("bad", bad, "eagle", "target_only"),
                ("ngram", None, "ngram", "target_only"), ("plain", None, "none", "target_only"),
                ("warm-sampled", warm, "eagle", "sampled"),  # greedy: the sampled rule is target-only
                ("group", None, "group", "target_only"), ("hybrid", warm, "hybrid", "sampled")]
        accept = {}
        for name, drafter, prop, rule in runs:
            # a chain and a tree for the warmed drafter (each strategy is its own compiled program: the bulk of the
            # time); the bad drafter's chain is the acceptance comparison
            strategies = {"warm": ["chain-4", "4_3_10"], "warm-sampled": ["4_3_10"],
                          "hybrid": ["4_3_10"]}.get(name, ["chain-4"])
            for strat in strategies:
                speculation = SpeculativeSpec(SpecStrategy.parse(strat), proposer=prop, rule=rule)
                out = generate(model, prompts, spec, speculation=speculation, drafter=drafter, max_new=limits)
                assert out.tokens == ref.tokens, (name, strat)
                assert out.finish_reasons == ref.finish_reasons, (name, strat)
                for a, b in zip(out.logprobs, ref.logprobs):
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # stored as float32
                accept[(name, strat)] = out.accept_len
        # the warmed drafter really speculates (long accepted runs, short of the rows' stops and limits), the bad
        # one barely
        assert accept[("warm", "4_3_10")] > 1.8, accept  # 2.05 measured
        assert accept[("warm", "chain-4")] > accept[("bad", "chain-4")], accept
        assert ref.finish_reasons.count("stop") >= 1 and "length" in ref.finish_reasons
        # Sampling (T = 0.5), the same seed: every target-only run commits at each answer position the token
        # plain decoding draws there (u(row, t)), so the answers are token-identical to plain sampling's; the
        # sampled rule draws other (equally distributed) answers.
        hot = RolloutSpec(max_new_tokens=40, chunk_steps=4, stop_tokens=stops,
                          sampling=SamplingParams(temperature=0.5))
        ref = generate(model, prompts, hot, max_new=limits, seed=3)
        assert ref.tokens != generate(model, prompts, hot, max_new=limits, seed=4).tokens
        hot_accept = {}
        for name, drafter, prop, strat in [("warm", warm, "eagle", "chain-4"), ("warm", warm, "eagle", "4_3_10"),
                                           ("ngram", None, "ngram", "chain-4"), ("group", None, "group", "chain-4")]:
            speculation = SpeculativeSpec(SpecStrategy.parse(strat), proposer=prop, rule="target_only")
            out = generate(model, prompts, hot, speculation=speculation, drafter=drafter, max_new=limits, seed=3)
            assert out.tokens == ref.tokens, (name, strat)
            assert out.finish_reasons == ref.finish_reasons, (name, strat)
            hot_accept[(name, strat)] = out.accept_len
        # drafts were accepted, not only bonus tokens (the random tiny target's distribution is flat: at T = 0.8
        # the acceptance was 1.01-1.05)
        assert min(hot_accept.values()) > 1.0, hot_accept
        sampled = generate(model, prompts, hot, speculation=SpeculativeSpec(SpecStrategy.parse("chain-4"),
                                                                             rule="sampled"),
                           drafter=warm, max_new=limits, seed=3)
        assert sampled.tokens != ref.tokens
