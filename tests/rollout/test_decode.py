"""Plain rollout: batching invariance, stop conditions, chunking, log-probs, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_model
from tlt_jax.core.errors import InputError
from tlt_jax.models import init_cache, prefill
from tlt_jax.rollout import RolloutSpec, SamplingParams, generate
from tlt_jax.rollout.sampling import sampling_logprobs


def prompts(n, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, 3 + 5 * i).tolist() for i in range(n)]


def test_batch_equals_each_prompt_alone():
    cfg, model = tiny_model()
    ps = prompts(5)
    spec = RolloutSpec(max_new_tokens=24, chunk_steps=8)
    batch = generate(model, ps, spec)
    for i, p in enumerate(ps):
        alone = generate(model, [p], spec)
        assert alone.tokens[0] == batch.tokens[i]
    assert len(set(map(tuple, batch.tokens))) == 5  # the answers differ: the test compares real content


def test_left_and_right_padding_agree():
    cfg, model = tiny_model()
    ps = prompts(4, seed=1)
    spec = RolloutSpec(max_new_tokens=16)
    assert generate(model, ps, spec, pad_side="left").tokens == generate(model, ps, spec, pad_side="right").tokens


def test_greedy_matches_step_by_step_full_forward():
    """Each greedy token is the argmax of a full (uncached) forward over prompt + answer so far."""
    cfg, model = tiny_model()
    p = prompts(1, seed=2)[0]
    res = generate(model, [p], RolloutSpec(max_new_tokens=12))
    graphdef, params = nnx.split(model)
    width = len(p) + len(res.tokens[0])

    # One compiled forward for every step, where eager calls on prefixes of 12 lengths compiled every op 12 times:
    # each prefix is right-padded to one width, and the causal mask alone hides the padding from its last token.
    @jax.jit
    def last_logits(params, tokens, valid):
        return prefill(nnx.merge(graphdef, params), tokens, valid, init_cache(cfg, 1, 64))[0][0, 0]

    seq = list(p)
    for t in res.tokens[0]:
        tokens, valid = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
        tokens[0, :len(seq)], valid[0, :len(seq)] = seq, True
        assert int(jnp.argmax(last_logits(params, tokens, valid))) == t
        seq.append(t)


def test_chunk_size_does_not_change_output():
    cfg, model = tiny_model()
    ps = prompts(3)
    a = generate(model, ps, RolloutSpec(max_new_tokens=20, chunk_steps=1))
    b = generate(model, ps, RolloutSpec(max_new_tokens=20, chunk_steps=64))
    assert a.tokens == b.tokens
    assert a.num_chunks == 19 and b.num_chunks == 1


def test_stop_token_and_length_limits():
    cfg, model = tiny_model()
    ps = prompts(3)
    free = generate(model, ps, RolloutSpec(max_new_tokens=20))
    stop = free.tokens[0][5]
    first = free.tokens[0].index(stop)
    res = generate(model, ps, RolloutSpec(max_new_tokens=20, stop_tokens=(stop,)), max_new=[20, 20, 7])
    assert res.tokens[0] == free.tokens[0][:first + 1] and res.finish_reasons[0] == "stop"
    assert res.tokens[2] == free.tokens[2][:min(7, len(res.tokens[2]))]
    if stop not in free.tokens[2][:7]:
        assert res.finish_reasons[2] == "length" and res.lengths[2] == 7


def test_cache_full_stops_row():
    cfg, model = tiny_model()
    p = prompts(1)[0]  # 3 tokens
    res = generate(model, [p], RolloutSpec(max_new_tokens=32), cache_len=10)
    assert res.finish_reasons == ["cache"] and res.lengths[0] == 10 - 3 + 1


def test_logprobs_are_those_of_the_sampling_distribution():
    cfg, model = tiny_model()
    p = prompts(1, seed=3)[0]
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    res = generate(model, [p], RolloutSpec(max_new_tokens=10, sampling=params), seed=7)
    seq = list(p) + res.tokens[0]
    logits, _, _ = prefill(model, jnp.asarray([seq]), jnp.ones((1, len(seq)), bool), init_cache(cfg, 1, 64),
                           all_logits=True)
    ref = sampling_logprobs(logits[0, len(p) - 1:-1], params)
    expected = np.asarray(jnp.take_along_axis(ref, jnp.asarray(res.tokens[0])[:, None], -1)[:, 0])
    np.testing.assert_allclose(res.logprobs[0], expected, atol=1e-4)
    assert np.all(np.isfinite(res.logprobs[0]))


def test_sampling_is_seeded():
    cfg, model = tiny_model()
    ps = prompts(2)
    spec = RolloutSpec(max_new_tokens=16, sampling=SamplingParams(1.0))
    assert generate(model, ps, spec, seed=1).tokens == generate(model, ps, spec, seed=1).tokens
    assert generate(model, ps, spec, seed=1).tokens != generate(model, ps, spec, seed=2).tokens


def test_prompt_longer_than_cache():
    cfg, model = tiny_model()
    with pytest.raises(InputError, match="does not fit a KV cache of 16 slots"):
        generate(model, [list(range(20))], RolloutSpec(max_new_tokens=4), cache_len=16)


def test_empty_prompt_and_bad_limits():
    cfg, model = tiny_model()
    with pytest.raises(InputError, match="empty"):
        generate(model, [[1, 2], []], RolloutSpec(max_new_tokens=4))
    with pytest.raises(InputError, match="max_new"):
        generate(model, [[1, 2]], RolloutSpec(max_new_tokens=4), max_new=[9])
