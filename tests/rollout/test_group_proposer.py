"""The group proposer: longest suffix match over a row's own text, its siblings' and its prompt's earlier answers;
the store of earlier answers; greedy identity and drafts that really come from siblings and stored answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tlt_jax.app.config import load_config
from tlt_jax.app.specs import engine_config, model_config, speculative_spec
from tlt_jax.core.errors import ConfigError
from tlt_jax.models import Decoder
from tlt_jax.rollout import RolloutSpec, generate
from tlt_jax.rollout.speculative import SpeculativeSpec
from tlt_jax.rollout.suffix import GroupStore, group_inputs, propose_suffix
from tlt_jax.rollout.tree import SpecStrategy


def _table(rows, width=12):
    t = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        t[i, :len(r)] = r
    return jnp.asarray(t), jnp.asarray([len(r) for r in rows], jnp.int32)


def test_suffix_match_prefers_the_longest_match_in_any_source():
    table, lens = _table([
        [5, 1, 2, 3, 9, 1, 2, 3],  # row 0: "1 2 3" seen before at 1..3 -> 9 1 2 (3-token match)
        [7, 7, 1, 2, 3, 4, 6, 6],  # row 1 (a sibling of 0): "7 1 2 3" -> 4 6 6; longer than row 0's own "x 1 2 3"
        [8, 8, 2, 3],  # row 2: its own "2 3" is new; its sibling row 0 has "2 3" -> 9 1 2 (most recent: 1 2 3 end)
        [4, 4, 4],  # row 3: alone, own text only: "4 4" at 0..1 -> 4 then the root (no token after the present)
    ])
    row = jnp.arange(4, dtype=jnp.int32)
    sources = jnp.asarray([[0, 1], [1, 0], [2, 0], [3, -1]], jnp.int32)
    drafts, match = propose_suffix(table, lens, row, sources, depth=3, max_n=8)
    drafts, match = np.asarray(drafts), np.asarray(match)
    np.testing.assert_array_equal(drafts[0], [9, 1, 2])  # own 3-token match (sibling row 1 has "1 2 3" too: tie)
    assert match[0] == 3
    np.testing.assert_array_equal(drafts[2], [9, 1, 2])
    assert match[2] == 2
    np.testing.assert_array_equal(drafts[3], [4, 4, 4])  # "4 4" ends at 1 -> 4 (pos 2, the root) then root fill
    assert match[3] == 2
    # the longest match wins across sources: row 0's last 4 tokens "9 1 2 3" only in itself; give row 0 a
    # sibling with "0 9 1 2 3 6" (5 tokens back: "3 9 1 2 3" vs own "...") -> the sibling's 4-token match
    table2, lens2 = _table([[5, 1, 2, 3, 9, 1, 2, 3], [0, 9, 1, 2, 3, 6, 6]])
    d2, m2 = propose_suffix(table2, lens2, jnp.asarray([0], jnp.int32), jnp.asarray([[0, 1]], jnp.int32), 2, 8)
    np.testing.assert_array_equal(np.asarray(d2)[0], [6, 6])
    assert int(m2[0]) == 4
    # shorter than min_n: no match, the root repeated
    d3, m3 = propose_suffix(table2, lens2, jnp.asarray([0], jnp.int32), jnp.asarray([[0, 1]], jnp.int32), 2, 8,
                            min_n=5)
    np.testing.assert_array_equal(np.asarray(d3)[0], [3, 3])
    assert int(m3[0]) == 0


def test_group_inputs_and_store():
    store = GroupStore(per_prompt=2, max_prompts=2)
    a, b, c = [1, 2], [3], [4, 4]
    store.record([a, a, a, b], [[10], [11], [12], [20]])
    assert store.answers(a) == [[12], [11]]  # most recent first, at most 2
    sources, bank, bank_len = group_inputs([a, b, a], cache_len=6, num_sources=4, store=store)
    # rows 0 and 2 are a group; each draws on at most as many stored answers as the group has rows (2)
    np.testing.assert_array_equal(sources, [[0, 2, 3, 4], [1, 5, -1, -1], [2, 0, 3, 4]])
    assert bank.shape == (3, 7)  # stored answers after their prompts
    np.testing.assert_array_equal(bank[:, :3], [[1, 2, 12], [1, 2, 11], [3, 20, 0]])
    np.testing.assert_array_equal(bank_len, [3, 3, 2])
    store.record([c], [[30]])  # a third prompt: the least recently used (a) is forgotten
    assert store.answers(a) == [] and store.answers(c) == [[30]] and len(store) == 2
    s2, bank2, _ = group_inputs([a, b, a], cache_len=6, num_sources=2)
    assert bank2 is None
    np.testing.assert_array_equal(s2, [[0, 2], [1, -1], [2, 0]])
    with pytest.raises(ConfigError, match="at least one answer"):
        GroupStore(0)


def test_group_sources_of_large_groups():
    # each row: itself, its first siblings in row order, then stored answers, at most C; 20,000 rows of one
    # prompt (the lossless tests' batches) lay out in linear time
    rng = np.random.default_rng(3)
    prompts = [[int(rng.integers(3))] for _ in range(40)]
    for c in (1, 2, 5, 40):
        sources, _, _ = group_inputs(prompts, cache_len=4, num_sources=c)
        for i, p in enumerate(prompts):
            want = ([i] + [j for j, q in enumerate(prompts) if q == p and j != i])[:c]
            np.testing.assert_array_equal(sources[i], want + [-1] * (c - len(want)))
    sources, _, _ = group_inputs([[7]] * 20_000, cache_len=4, num_sources=3)
    np.testing.assert_array_equal(sources[[0, 1, 2, 19_999]], [[0, 1, 2], [1, 0, 2], [2, 0, 1], [19_999, 0, 1]])


def test_group_config_errors():
    for over, msg in ((["speculative.proposer=group", "speculative.rule=sampled"], "drafts deterministically"),
                      (["speculative.proposer=group", "speculative.strategy=4_2_8"], "chains only"),
                      (["speculative.proposer=medusa"], "speculative.proposer must be one of"),
                      (["speculative.hybrid_min=9"], "hybrid_min"),
                      (["speculative.group_sources=0"], "group_sources")):
        with pytest.raises(ConfigError, match=msg):
            speculative_spec(load_config("tiny", over))
    hybrid = speculative_spec(load_config("tiny", ["speculative.proposer=hybrid", "speculative.rule=sampled",
                                                   "speculative.strategy=4_2_8"]))
    assert hybrid.learned and hybrid.arm == "hybrid:4_2_8@sampled"
    # the default rule, auto: sampled where the learned drafter drafts, target-only for the model-free proposers;
    # the engine's arms without a rule follow it
    assert speculative_spec(load_config("tiny")).rule == "sampled"
    assert speculative_spec(load_config("tiny", ["speculative.proposer=group"])).rule == "target_only"
    engine = engine_config(load_config("tiny", ["tlt.arms=('chain-4','4_2_8@target_only')",
                                                "tlt.ngram_arms=('ngram:chain-3',)"]))
    assert engine.arms == ("chain-4@sampled", "4_2_8") and engine.ngram_arms == ("ngram:chain-3",)
    with pytest.raises(ConfigError, match="not a learned-drafter"):
        engine_config(load_config("tiny", ["tlt.arms=('group:chain-4',)"]))
    assert SpeculativeSpec.from_arm("group:chain-4").arm == "group:chain-4"
    assert SpeculativeSpec.from_arm("hybrid:4_2_8@sampled", suffix_max=6).suffix_max == 6


def test_group_drafts_from_siblings_and_stored_answers_greedy_identical():
    """Greedy, float64: the group proposer's answers equal plain decoding's; the second rollout of the same prompts
    drafts from the first one's stored answers (the same greedy text) and accepts almost every draft."""
    with jax.enable_x64(True):
        over = ["model.dtype=float64", "model.param_dtype=float64"]
        model = Decoder(model_config(load_config("tiny", over)), nnx.Rngs(1))
        rng = np.random.default_rng(3)
        base = [rng.integers(0, model.cfg.vocab_size, size=n).tolist() for n in (5, 9)]
        prompts = [base[0]] * 3 + [base[1]] * 3
        spec = RolloutSpec(max_new_tokens=32, chunk_steps=4)
        ref = generate(model, prompts, spec)
        speculation = SpeculativeSpec(SpecStrategy.parse("chain-4"), proposer="group")
        store = GroupStore(per_prompt=2)
        first = generate(model, prompts, spec, speculation=speculation, store=store)
        second = generate(model, prompts, spec, speculation=speculation, store=store)
        ngram = generate(model, prompts, spec, speculation=SpeculativeSpec(SpecStrategy.parse("chain-4"),
                                                                           proposer="ngram"))
        assert first.tokens == ref.tokens and second.tokens == ref.tokens and ngram.tokens == ref.tokens
        assert len(store) == 2
        # stored answers equal to the answer being generated: every draft is accepted (chain-4: 5 per forward,
        # a little less at the end of an answer)
        assert second.accept_len > 4.0 > first.accept_len, (first.accept_len, second.accept_len)
        assert second.accept_len > ngram.accept_len
