"""The online drafter's data buffer (window cut, eviction, one-step offset, packing) and the packed EAGLE loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_model
from tlt_jax.drafter.buffer import DrafterBuffer
from tlt_jax.drafter.loss import drafter_loss, segment_positions, target_features
from tlt_jax.core.optim import make_optimizer
from tlt_jax.drafter.train import split_drafter, train_step
from tlt_jax.core.errors import ConfigError, InputError
from tlt_jax.models.drafter import Drafter

H = 3  # feature channels of the hand-made batches: (token id, source row id + 100 x step, source position)


def _layout(prompts, answers, p, n, step=0):
    """The trainer's layout (left-padded prompt of p slots, answer in n slots) with traceable features."""
    b = len(prompts)
    tokens = np.zeros((b, p + n), np.int32)
    valid = np.zeros((b, p + n), bool)
    for i, (pr, an) in enumerate(zip(prompts, answers)):
        tokens[i, p - len(pr):p] = pr
        tokens[i, p:p + len(an)] = an
        valid[i, p - len(pr):p] = True
        valid[i, p:p + len(an)] = True
    feats = np.zeros((b, p + n, H), np.float32)
    feats[..., 0] = tokens
    feats[..., 1] = np.arange(b)[:, None] + 100 * step
    feats[..., 2] = np.arange(p + n)[None]
    return tokens, feats, valid


def _batch(step, lens, p=4, n=8, seed=0):
    """Rows of answers of the given lengths (prompts of 3 tokens) at ``step``."""
    rng = np.random.default_rng(seed + 17 * step)
    prompts = [rng.integers(1, 200, 3).tolist() for _ in lens]
    answers = [rng.integers(1, 200, k).tolist() for k in lens]
    return _layout(prompts, answers, p, n, step)


def _only(buf, step=1, seq_len=64):
    """The one sequence a buffer holds, as (tokens, feats, loss_mask) (the row is filled with copies of it)."""
    pb = buf.sample(np.random.default_rng(0), step, 1, seq_len)
    sel = pb.segments[0] == 1
    for k in range(2, int(pb.segments.max()) + 1):
        np.testing.assert_array_equal(pb.tokens[0, pb.segments[0] == k], pb.tokens[0, sel])
    return pb.tokens[0, sel], pb.feats[0, sel], pb.loss_mask[0, sel]


def test_add_cuts_the_window_and_marks_the_answer():
    # P = 6 prompt slots, N = 6 answer slots; prompt [11, 12, 13, 14] left padded, answer [21..24] + 2 pads
    tokens, feats, valid = _layout([[11, 12, 13, 14]], [[21, 22, 23, 24]], 6, 6)
    buf = DrafterBuffer(capacity=8, window=16)
    assert buf.add(0, tokens, jnp.asarray(feats), valid, answer_start=6) == 1
    tok, f, lm = _only(buf)
    assert tok.tolist() == [14, 21, 22, 23, 24]  # from the last prompt token to the last valid token
    assert lm.tolist() == [False, True, True, True, True]
    np.testing.assert_array_equal(f[:, 0], tok)  # features of those very tokens
    assert f[:, 2].tolist() == [5, 6, 7, 8, 9]

    # a window shorter than the answer keeps its last tokens (all of them answer tokens)
    buf = DrafterBuffer(capacity=8, window=3)
    buf.add(0, tokens, feats, valid, answer_start=6)
    tok, f, lm = _only(buf)
    assert tok.tolist() == [22, 23, 24] and lm.all() and f[:, 2].tolist() == [7, 8, 9]

    # answers of fewer than 2 tokens are skipped; 2 are enough
    tokens, feats, valid = _layout([[5, 6], [5, 6], [5, 6]], [[], [7], [7, 8]], 4, 4)
    buf = DrafterBuffer()
    assert buf.add(3, tokens, feats, valid, answer_start=4) == 1 and len(buf) == 1
    tok, _, lm = _only(buf, step=4)
    assert tok.tolist() == [6, 7, 8] and lm.tolist() == [False, True, True]
    assert buf.nbytes == 3 * 4 + 3 * H * 4 + 3


def test_eviction_keeps_capacity_and_drops_the_oldest_step_first():
    buf = DrafterBuffer(capacity=5, window=16)
    for step in range(3):
        assert buf.add(step, *_batch(step, [4, 5, 6]), answer_start=4) == 3
        assert len(buf) == min(5, 3 * (step + 1))
    assert buf.steps() == [1, 2]  # step 0 went first, then the older rows of step 1
    pb = buf.sample(np.random.default_rng(0), 2, 4, 64)
    assert set(pb.steps.tolist()) == {1}
    assert sorted(set(pb.feats[..., 1][pb.segments > 0].astype(int).tolist())) == [101, 102]
    # a late batch of an older step is the first to go
    buf.add(0, *_batch(0, [4]), answer_start=4)
    assert len(buf) == 5 and buf.steps() == [1, 2]


def test_sampling_keeps_the_one_step_offset():
    buf = DrafterBuffer(capacity=64, window=16, max_step_lag=2)
    rng = np.random.default_rng(0)
    buf.add(3, *_batch(3, [4, 5]), answer_start=4)
    assert buf.sample(rng, 3, 2, 32) is None  # only the current step's data: nothing to train on
    assert buf.sample(rng, 2, 2, 32) is None
    pb = buf.sample(rng, 4, 2, 32)
    assert pb is not None and set(pb.steps.tolist()) == {3}
    buf.add(4, *_batch(4, [4, 5, 6]), answer_start=4)
    for _ in range(10):
        pb = buf.sample(rng, 4, 2, 32)
        assert set(pb.steps.tolist()) == {3}
        assert (pb.feats[..., 1][pb.segments > 0] < 400).all()  # no token of step 4 in the batch
    assert set(buf.sample(rng, 5, 4, 32).steps.tolist()) == {3, 4}
    assert set(buf.sample(rng, 6, 4, 32).steps.tolist()) == {4}  # step 3 is older than the lag
    assert buf.sample(rng, 7, 4, 32) is None


def test_packing_puts_short_sequences_in_one_row_with_their_features():
    buf = DrafterBuffer(capacity=16, window=16)
    tokens, feats, valid = _batch(0, [2, 3, 4, 5], p=4, n=6)
    buf.add(0, tokens, feats, valid, answer_start=4)
    pb = buf.sample(np.random.default_rng(1), 1, 2, 40)
    assert pb.tokens.shape == (2, 40) and pb.feats.shape == (2, 40, H) and pb.segments.dtype == np.int32
    # sequences of 3..6 tokens (last prompt token + answer): all four go to row 0 first, in random order, then
    # copies fill the rest (each sequence is drawn once before any is drawn again)
    assert pb.segments[0].max() >= 4
    assert len(pb.steps) == int(pb.segments.max(1).sum())
    first = {int(pb.feats[0, pb.segments[0] == k][0, 1]) for k in range(1, 5)}
    assert first == {0, 1, 2, 3}
    assert int((pb.segments > 0).sum()) >= 2 * 40 - 2  # full up to less than the shortest sequence
    for r in range(2):
        seg = pb.segments[r]
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # right padded
        assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
        assert (pb.tokens[r, used:] == 0).all() and (pb.feats[r, used:] == 0).all() and not pb.loss_mask[r, used:].any()
        for k in range(1, int(seg.max()) + 1):
            sel = seg == k
            tok, f, lm = pb.tokens[r, sel], pb.feats[r, sel], pb.loss_mask[r, sel]
            src = int(f[0, 1])
            assert (f[:, 1] == src).all()  # one source row per segment
            np.testing.assert_array_equal(f[:, 0], tok)  # features line up with their tokens
            pos = f[:, 2].astype(int)
            assert pos[0] == 3 and (np.diff(pos) == 1).all()  # last prompt token, then the answer in order
            np.testing.assert_array_equal(tok, tokens[src, pos])
            assert lm.tolist() == [False] + [True] * (len(tok) - 1)
    # long sequences keep their last seq_len tokens
    pb = buf.sample(np.random.default_rng(2), 1, 3, 4)
    for r in range(3):
        for k in range(1, int(pb.segments[r].max()) + 1):
            f = pb.feats[r, pb.segments[r] == k]
            src = int(f[0, 1])
            assert f[-1, 2] == 3 + [2, 3, 4, 5][src]  # ends at the answer's last token


def test_input_validation():
    for kw in ({"capacity": 0}, {"window": 1}, {"max_step_lag": 0}):
        with pytest.raises(ConfigError):
            DrafterBuffer(**kw)
    buf = DrafterBuffer()
    tokens, feats, valid = _batch(0, [3, 4])
    with pytest.raises(InputError, match="valid"):
        buf.add(0, tokens, feats, valid[:, :-1], answer_start=4)
    with pytest.raises(InputError, match="feats"):
        buf.add(0, tokens, feats[:1], valid, answer_start=4)
    with pytest.raises(InputError, match="tokens"):
        buf.add(0, tokens[0], feats, valid, answer_start=4)
    with pytest.raises(InputError, match="answer_start"):
        buf.add(0, tokens, feats, valid, answer_start=99)
    buf.add(0, tokens, feats, valid, answer_start=4)
    with pytest.raises(InputError, match="hidden size"):
        buf.add(1, tokens, np.zeros(tokens.shape + (H + 1,), np.float32), valid, answer_start=4)
    with pytest.raises(ConfigError, match="seq_len"):
        buf.sample(np.random.default_rng(0), 1, 1, 1)
    with pytest.raises(ConfigError, match="rows"):
        buf.sample(np.random.default_rng(0), 1, 0, 8)


def test_positions_restart_at_each_segment():
    # (RoPE is relative, so within-segment attention alone hides a missing restart from the loss; check it here)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_packed_loss_equals_the_token_weighted_separate_losses():
    cfg, model = tiny_model()
    drafter = Drafter(cfg, nnx.Rngs(5))
    head_w = drafter.head_weight(model)
    loss_fn = jax.jit(lambda *a, **k: drafter_loss(drafter, model, *a, **k))
    rng = np.random.default_rng(0)
    lens = (7, 9)
    # each sequence alone, right padded to one length (one compile; padding after a sequence does not change it)
    alone = np.zeros((2, max(lens)), np.int32)
    valid = np.zeros((2, max(lens)), bool)
    for i, k in enumerate(lens):
        alone[i, :k] = rng.integers(1, 200, k)
        valid[i, :k] = True
    feats = np.asarray(target_features(model, jnp.asarray(alone), jnp.asarray(valid)))
    masks = valid & (np.arange(max(lens))[None] >= 2)  # the first two tokens play the prompt
    losses, counts = [], []
    for i in range(2):
        loss, met = loss_fn(jnp.asarray(alone[i:i + 1]), jnp.asarray(feats[i:i + 1]), jnp.asarray(masks[i:i + 1]),
                            head_w)
        losses.append(float(loss))
        counts.append(float(met["tokens"]))
    assert counts == [5.0, 7.0]
    expected = (losses[0] * counts[0] + losses[1] * counts[1]) / sum(counts)

    # both in one row: [seq 1 | seq 2 | padding]
    n1, n = lens[0], sum(lens)
    L = n + 4
    tokens = np.zeros((1, L), np.int32)
    packed = np.zeros((1, L, cfg.hidden_size), np.float32)
    segments = np.zeros((1, L), np.int32)
    loss_mask = np.ones((1, L), bool)  # also set where it must not count: the padding, and ...
    tokens[0, :n] = np.concatenate([alone[0, :n1], alone[1, :lens[1]]])
    packed[0, :n] = np.concatenate([feats[0, :n1], feats[1, :lens[1]]])
    segments[0, :n] = np.repeat([1, 2], lens)
    loss_mask[0, :n] = np.concatenate([masks[0, :n1], masks[1, :lens[1]]])
    loss_mask[0, n1] = True  # ... the first token of sequence 2, whose pair would cross from sequence 1
    args = (jnp.asarray(tokens), jnp.asarray(packed), jnp.asarray(loss_mask), head_w)
    loss, met = loss_fn(*args, segments=jnp.asarray(segments))
    assert float(met["tokens"]) == sum(counts)
    np.testing.assert_allclose(float(loss), expected, rtol=0, atol=1e-5)
    # ignoring the segments (attention across sequences, positions not restarted, crossing pairs) is wrong
    unsegmented, _ = loss_fn(*args)
    assert abs(float(unsegmented) - expected) > 1e-3

    # the jitted update takes the segments too; its metrics are those of the parameters before the update
    graphdef, params, frozen = split_drafter(drafter)
    target_graphdef, target_params = nnx.split(model)
    opt = make_optimizer(1e-3, warmup_steps=20, cosine_steps=10)
    params = jax.tree.map(jnp.copy, params)
    _, _, met = train_step(params, frozen, opt.init(params), target_params, *args[:3], segments=jnp.asarray(segments),
                           drafter_graphdef=graphdef, target_graphdef=target_graphdef, optimizer=opt)
    np.testing.assert_allclose(float(met["loss"]), expected, rtol=0, atol=1e-5)
