"""GRPO training laid out on a mesh: FSDP + tensor parallelism give the single-device update, and the trainer
keeps its policy and optimizer state sharded through rollouts, checkpoints and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tlt_jax.app.config import load_config
from tlt_jax.app.build import model_from_config
from tlt_jax.core.optim import make_optimizer
from tlt_jax.parallel import sharding as shd
from tlt_jax.parallel.mesh import make_mesh
from tlt_jax.rl import grpo
from tlt_jax.app.trainer import Trainer
from tests.rl.test_trainer import TINY_RL


def _batch(b=8, p=16, n=16, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, p + n)).astype(np.int32)
    valid = np.ones((b, p + n), bool)
    valid[:, :3] = False  # left padding
    amask = np.ones((b, n), bool)
    amask[:, 12:] = False  # answers of different lengths
    return tokens, valid, amask, rng.normal(size=b).astype(np.float32)


@pytest.mark.parametrize("fsdp,tensor", [(4, 2), (2, 4)])
def test_sharded_update_equals_the_single_device_update(fsdp, tensor):
    config = load_config("configs/tiny.py", ["model.arch.vocab_size=512", f"mesh.fsdp={fsdp}",
                                             f"mesh.tensor={tensor}"])
    _, model = model_from_config(config, None)
    graphdef, params = nnx.split(model)
    tokens, valid, amask, adv = _batch()
    old, _, _ = grpo.logprob_forward(params, tokens, valid, graphdef=graphdef, num_answer=16, temperature=1.0)
    host = (tokens, valid, amask, adv, np.asarray(old) - 0.01, np.asarray(old) + 0.02)  # ratio and KL terms live
    cfg = grpo.GRPOConfig(kl_coef=0.1)
    sgd = optax.sgd(1.0)  # new params = params - gradient: the comparison sees the gradient itself
    ref, _, ref_m = grpo.update_step(jax.tree.map(jnp.copy, params), sgd.init(params), grpo.TrainBatch(*host),
                                     graphdef=graphdef, optimizer=sgd, config=cfg)

    mesh = make_mesh(config.mesh, jax.devices()[:8])
    pshard = shd.tree_shardings(params, mesh)
    gparams = shd.tree_to_global(params, pshard)
    oshard = shd.opt_state_shardings(jax.eval_shape(sgd.init, gparams), gparams, pshard, mesh)
    rows = grpo.batch_shardings(mesh, 8)
    # the log-prob forward on the mesh
    logp, _, hidden = grpo.sharded_logprob(mesh, graphdef, 16, 1.0, pshard, rows)(
        gparams, shd.to_global(tokens, rows.tokens), shd.to_global(valid, rows.valid))
    np.testing.assert_allclose(shd.to_host(logp), np.asarray(old), rtol=1e-5, atol=1e-5)
    assert hidden.sharding.spec[0] == ("data", "fsdp")
    # the update on the mesh
    update = grpo.sharded_update(mesh, graphdef, sgd, cfg, pshard, oshard, rows)
    new, _, m = update(gparams, jax.jit(sgd.init, out_shardings=oshard)(gparams),
                       grpo.TrainBatch(*(shd.to_global(x, s) for x, s in zip(host, rows))))
    for key in ("pg_loss", "kl", "grad_norm"):
        np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=1e-5, err_msg=key)
    for (path, a), b, p0, s in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(new),
                                   jax.tree.leaves(params), jax.tree.leaves(pshard)):
        assert b.sharding == s, jax.tree_util.keystr(path)  # the update keeps the layout
        grad_ref, grad = np.asarray(p0) - np.asarray(a), np.asarray(p0) - shd.to_host(b)
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4 * np.abs(grad_ref).max() + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))


def test_opt_state_follows_the_parameter_layout():
    config = load_config("configs/tiny.py", ["mesh.fsdp=4", "mesh.tensor=2"])
    _, model = model_from_config(config, None)
    _, params = nnx.split(model)
    mesh = make_mesh(config.mesh, jax.devices()[:8])
    pshard = shd.tree_shardings(params, mesh)
    opt = make_optimizer(1e-3)
    oshard = shd.opt_state_shardings(jax.eval_shape(opt.init, params), params, pshard, mesh)
    leaves = jax.tree.leaves(oshard)
    moments = [s for s in leaves if s.spec != P()]
    assert len(moments) == 2 * sum(s.spec != P() for s in jax.tree.leaves(pshard))  # Adam's mu and nu
    assert P("fsdp", "tensor") in {s.spec for s in moments}


def test_trainer_keeps_policy_and_optimizer_sharded_through_steps_and_resume(tmp_path):
    extra = ["tlt.enable=True", "tlt.replicas=2"]  # the adaptive engine's replicas share the training devices
    overrides = TINY_RL + ["rl.kl_coef=0.05", "train.plots=False", "train.tensorboard=False", "mesh.fsdp=4",
                           "mesh.tensor=2"] + extra
    wd = str(tmp_path / "run")
    trainer = Trainer(load_config("configs/tiny.py", overrides + ["rl.steps=2"]), wd, log=lambda m: None)
    q = [s for p, s in jax.tree_util.tree_leaves_with_path(trainer.param_shards)
         if "q_proj" in jax.tree_util.keystr(p)][0]
    assert q.spec == P("fsdp", "tensor")  # FSDP over 4 devices, heads over 2
    assert sorted(d.id for r in trainer.engine.replicas for d in r.devices) == [d.id for d in trainer.devices]
    before = shd.to_host(jax.tree.leaves(trainer.params)[0])
    history = trainer.run(progress=False)
    assert [h["step"] for h in history] == [1, 2]
    for leaf, s in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(trainer.param_shards)):
        assert leaf.sharding == s
    moments = [x for x in jax.tree.leaves(trainer.opt_state) if getattr(x, "ndim", 0) == 2]
    assert moments and all(not x.is_fully_replicated for x in moments)
    assert np.abs(shd.to_host(jax.tree.leaves(trainer.params)[0]) - before).max() > 0  # it trained
    # resume: the restored state is the saved one, laid out the same way
    again = Trainer(load_config("configs/tiny.py", overrides + ["rl.steps=3"]), wd, resume=True, log=lambda m: None)
    assert again.step == 2
    for a, b in zip(jax.tree.leaves((trainer.params, trainer.opt_state)),
                    jax.tree.leaves((again.params, again.opt_state))):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(shd.to_host(a), shd.to_host(b))
