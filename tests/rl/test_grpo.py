import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from flax import nnx

from tests.helpers import tiny_model
from tlt_jax.core.optim import make_optimizer
from tlt_jax.core.shapes import answer_width, answer_widths
from tlt_jax.parallel.mesh import make_mesh
from tlt_jax.rl import grpo
from tlt_jax.rl.step import RLStep, build_batch
from tlt_jax.rollout import RolloutSpec, SamplingParams
from tlt_jax.rollout.host import PlainRollout


def test_group_advantages():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
    a = grpo.group_advantages(r, "grpo").reshape(3, 4)
    np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(a[1], 0.0)
    np.testing.assert_allclose(a[2], (r[2] - 1.0) / r[2].std(), atol=1e-5)
    d = grpo.group_advantages(r, "drgrpo").reshape(3, 4)
    np.testing.assert_allclose(d[0], [0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="num_prompts, group_size"):
        grpo.group_advantages(np.zeros(4))
    with pytest.raises(ValueError, match="advantage kind"):
        grpo.group_advantages(r, "ppo")


def _batch(logp_old, adv, mask, ref=None):
    b, n = mask.shape
    z = jnp.zeros((b, n + 1), jnp.int32)
    return grpo.TrainBatch(z, z.astype(bool), jnp.asarray(mask), jnp.asarray(adv, jnp.float32),
                           jnp.asarray(logp_old, jnp.float32),
                           jnp.zeros((b, n)) if ref is None else jnp.asarray(ref, jnp.float32))


def test_policy_loss_clip_aggregation_and_kl():
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
    old = np.full((2, 4), -1.0)
    cfg = grpo.GRPOConfig(clip_eps=0.2)
    # ratio 1: loss is minus the (token- or sequence-) mean advantage
    loss, m = grpo.policy_loss(jnp.asarray(old), _batch(old, [1.0, -1.0], mask), cfg)
    assert float(loss) == pytest.approx(-(4 * 1.0 - 1.0) / 5)
    loss, _ = grpo.policy_loss(jnp.asarray(old), _batch(old, [1.0, -1.0], mask), cfg._replace(aggregation="seq_mean"))
    assert float(loss) == pytest.approx(0.0)
    # ratio 1.5 with a positive advantage is clipped at 1.2; with a negative one the unclipped term wins
    new = old + np.log(1.5)
    loss, m = grpo.policy_loss(jnp.asarray(new), _batch(old, [1.0, 1.0], mask), cfg)
    assert float(loss) == pytest.approx(-1.2) and float(m["clip_frac"]) == pytest.approx(1.0)
    loss, _ = grpo.policy_loss(jnp.asarray(new), _batch(old, [-1.0, -1.0], mask), cfg)
    assert float(loss) == pytest.approx(1.5)
    # k3 KL: zero at the reference, positive away from it, and added with its coefficient
    kcfg = cfg._replace(kl_coef=0.5)
    _, m0 = grpo.policy_loss(jnp.asarray(old), _batch(old, [0.0, 0.0], mask, ref=old), kcfg)
    loss, m1 = grpo.policy_loss(jnp.asarray(old), _batch(old, [0.0, 0.0], mask, ref=old - 0.3), kcfg)
    assert float(m0["kl"]) == pytest.approx(0.0)
    k3 = np.exp(-0.3) + 0.3 - 1.0
    assert float(m1["kl"]) == pytest.approx(k3, rel=1e-5) and float(loss) == pytest.approx(0.5 * k3, rel=1e-5)


def test_answer_logprobs_of_a_padded_batch_match_each_row_alone():
    cfg, model = tiny_model(seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (3, 7, 5)]
    answers = [rng.integers(1, 200, size=n).tolist() for n in (4, 6, 1)]
    p, n = 8, 6
    tokens = np.zeros((3, p + n), np.int32)
    valid = np.zeros((3, p + n), bool)
    for i, (pr, an) in enumerate(zip(prompts, answers)):
        tokens[i, p - len(pr):p], valid[i, p - len(pr):p] = pr, True
        tokens[i, p:p + len(an)], valid[i, p:p + len(an)] = an, True
    logp, ent, hidden = grpo.answer_logprobs(model, jnp.asarray(tokens), jnp.asarray(valid), n, 0.7)
    assert hidden.shape == (3, p + n, cfg.hidden_size)
    # the LM head over chunks of 4 answer positions (4 + 2) gives the same values
    lp4, ent4, _ = grpo.answer_logprobs(model, jnp.asarray(tokens), jnp.asarray(valid), n, 0.7, chunk=4)
    np.testing.assert_allclose(np.asarray(lp4), np.asarray(logp), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent4), np.asarray(ent), atol=1e-6)
    for i, (pr, an) in enumerate(zip(prompts, answers)):
        seq = jnp.asarray([pr + an])
        t = seq.shape[1]
        logits = model(seq, jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None]).logits[0]
        lp = jax.nn.log_softmax(logits / 0.7, axis=-1)
        want = [float(lp[len(pr) - 1 + j, tok]) for j, tok in enumerate(an)]
        np.testing.assert_allclose(np.asarray(logp[i, :len(an)]), want, atol=2e-5)
        full = np.asarray(-(jnp.exp(lp) * lp).sum(-1))[len(pr) - 1:len(pr) - 1 + len(an)]
        np.testing.assert_allclose(np.asarray(ent[i, :len(an)]), full, rtol=1e-5)


def _train_setup(adv):
    cfg, model = tiny_model(seed=2)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)  # update_step donates its input; the cached model keeps its own
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 200, size=(4, 12)), jnp.int32)
    valid = jnp.ones((4, 12), bool)
    amask = jnp.ones((4, 8), bool)
    old, _, _ = grpo.logprob_forward(params, tokens, valid, graphdef=graphdef, num_answer=8, temperature=1.0)
    batch = grpo.TrainBatch(tokens, valid, amask, jnp.asarray(adv, jnp.float32), old, jnp.zeros_like(old))
    return graphdef, params, batch


def test_updates_raise_the_likelihood_of_advantaged_answers():
    graphdef, params, batch = _train_setup([1.0, 1.0, -1.0, -1.0])
    opt = make_optimizer(1e-3)
    state = opt.init(params)
    cfg = grpo.GRPOConfig()
    before = np.asarray(batch.old_logp.sum(1))
    for _ in range(5):
        params, state, m = grpo.update_step(params, state, batch, graphdef=graphdef, optimizer=opt, config=cfg)
        assert float(m["skipped"]) == 0 and np.isfinite(float(m["grad_norm"]))
    after, _, _ = grpo.logprob_forward(params, batch.tokens, batch.valid, graphdef=graphdef, num_answer=8,
                                       temperature=1.0)
    delta = np.asarray(after.sum(1)) - before
    assert delta[0] > 0 and delta[1] > 0 and delta[2] < 0 and delta[3] < 0, delta


def test_a_nan_loss_skips_the_update():
    graphdef, params, batch = _train_setup([1.0, np.nan, -1.0, 0.0])
    opt = make_optimizer(1e-3)
    state = opt.init(params)
    before = jax.tree.map(np.asarray, params)
    state_before = jax.tree.map(np.asarray, state)
    params, state, m = grpo.update_step(params, state, batch, graphdef=graphdef, optimizer=opt,
                                        config=grpo.GRPOConfig())
    assert float(m["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(state_before), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_remat_gives_the_same_update():

    graphdef, params, batch = _train_setup([1.0, -0.5, 0.25, -0.75])
    sgd = optax.sgd(1.0)  # new params = params - gradient
    out = {}
    for remat in (False, True):
        p = jax.tree.map(jnp.copy, params)
        out[remat], _, _ = grpo.update_step(p, sgd.init(p), batch, graphdef=graphdef, optimizer=sgd,
                                            config=grpo.GRPOConfig(remat=remat))
    moved = 0.0
    for a, b, p0 in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True]), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(p0)).max()))
    assert moved > 1e-4  # a real gradient step was compared
    for remat in (False, True):  # the layers are rematerialised in the backward pass only when asked
        text = grpo.update_step.lower(params, sgd.init(params), batch, graphdef=graphdef, optimizer=sgd,
                                      config=grpo.GRPOConfig(remat=remat)).as_text()
        assert ("optimization_barrier" in text) == remat


def test_bucketed_widths_and_a_chunked_head_train_like_the_padded_batch():
    assert answer_widths(128, 4) == (16, 32, 64, 128) and answer_widths(100, 3) == (32, 56, 100)
    assert answer_widths(128, 1) == (128,) and answer_width(0, 128, 4) == 16
    assert answer_width(17, 128, 4) == 32 and answer_width(500, 128, 4) == 128
    with pytest.raises(ValueError, match=">= 1"):
        answer_widths(128, 0)
    cfg, model = tiny_model(seed=3)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (3, 7, 5, 2)]
    answers = [rng.integers(1, 200, size=n).tolist() for n in (9, 2, 13, 0)]
    adv = np.array([1.0, -0.5, 0.25, -1.0])
    grpo_cfgs = [grpo.GRPOConfig(temperature=0.7, kl_coef=0.1, aggregation="seq_mean")]
    results = {}
    for buckets in (1, 4):
        tokens, valid, amask, a = build_batch(prompts, answers, adv, prompt_multiple=8, max_new_tokens=64,
                                              answer_buckets=buckets)
        n = amask.shape[1]
        assert n == (64 if buckets == 1 else 16)
        old, _, _ = grpo.logprob_forward(params, tokens, valid, graphdef=graphdef, num_answer=n, temperature=0.7)
        old = np.asarray(old) - 0.05 * amask  # a ratio away from 1 so that clipping and the KL take part
        batch = grpo.TrainBatch(*(jnp.asarray(x) for x in (tokens, valid, amask, a, old, old - 0.1)))
        for c in grpo_cfgs:
            # the bucketed batch also runs the LM head over chunks of 8 answer positions (16 = 8 + 8)
            def loss(p, batch, c=c, n=n, chunk=8 if buckets > 1 else grpo.LOGIT_CHUNK):
                logp, _, _ = grpo.answer_logprobs(nnx.merge(graphdef, p), batch.tokens, batch.valid, n, c.temperature,
                                                  chunk=chunk)
                return grpo.policy_loss(logp, batch, c)[0]
            results[buckets, c] = jax.jit(jax.value_and_grad(loss))(params, batch)
    for c in grpo_cfgs:
        (l1, g1), (l4, g4) = results[1, c], results[4, c]
        assert float(l1) != 0.0
        np.testing.assert_allclose(float(l4), float(l1), rtol=1e-5)
        for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


class _Limited(PlainRollout):
    """Plain decoding with a length limit per row: answers of 3 to 30 tokens in a fixed pattern."""

    LIMITS = [3, 30, 5, 2, 7, 4, 6, 1]

    def generate(self, params, prompts, **kw):
        return super().generate(params, prompts, max_new=self.LIMITS, **kw)


def test_each_mini_batch_trains_at_its_own_width_like_the_padded_batch():
    """RLStep with 4 mini-batches of 2 answers, one of them 30 tokens long (cap 32): with answer buckets every
    mini-batch is cut to its own longest answer (one at width 32, three at 8), and the step ends with the
    parameters and losses of the batch padded to the cap (plain SGD: the parameters move by the gradients)."""
    cfg, model = tiny_model(seed=2)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (4, 6, 3, 5) for _ in range(2)]
    spec = RolloutSpec(max_new_tokens=32, sampling=SamplingParams(temperature=1.0), chunk_steps=8)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    out = {}
    for buckets in (1, 4):
        step = RLStep(graphdef, jax.tree.map(jnp.copy, params), mesh,
                      rollout=_Limited(graphdef, spec), reward_fn=lambda a, g, f: [len(x) % 3 for x in a],
                      grpo_config=grpo.GRPOConfig(), optimizer=optax.sgd(1.0), decode=str,
                      minibatches=4, prompt_multiple=8, max_new_tokens=32, answer_buckets=buckets)
        res = step.run(prompts, [""] * len(prompts), group_size=2, index=0)
        assert list(res.rollout.lengths) == _Limited.LIMITS
        out[buckets] = res.metrics, [np.asarray(x) for x in jax.tree.leaves(step.params)]
    (m1, p1), (m4, p4) = out[1], out[4]
    assert m1["update_widths"] == [32] * 4 and sorted(m4["update_widths"]) == [8, 8, 8, 32]
    assert m1["pg_loss"] != 0.0
    for k in ("pg_loss", "grad_norm", "entropy", "ratio_mean"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
    moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(p1, jax.tree.leaves(params)))
    assert moved > 1e-4  # the updates changed the policy
    for a, b in zip(p1, p4):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
