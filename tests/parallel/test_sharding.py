"""Sharding on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported)."""

import jax
import numpy as np
import pytest

from tests.helpers import tiny_model
from tlt_jax.app.config import load_config
from tlt_jax.app.inspect import inspect_config
from tlt_jax.core.errors import ConfigError
from flax import nnx
from jax.sharding import PartitionSpec as P

from tlt_jax.models.drafter import Drafter
from tlt_jax.parallel import PARAM_RULES, STATE_RULES, ShardingRule, make_mesh, shard_model, spec_for
from tlt_jax.parallel.mesh import first_local, mesh_shape
from tlt_jax.rollout import RolloutSpec, SpeculativeSpec, SpecStrategy, generate

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


@needs8
@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_greedy_rollout_equals_single_device(mesh):
    cfg, model = tiny_model()
    c = load_config("tiny", [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"])
    rng = np.random.RandomState(0)
    ps = [rng.randint(0, 256, 2 + 3 * i).tolist() for i in range(8)]
    spec = RolloutSpec(max_new_tokens=16, chunk_steps=8)
    single = generate(model, ps, spec)
    m = make_mesh(c.mesh)
    sharded_model = shard_model(model, m)
    q = sharded_model.layers[0].self_attn.q_proj.kernel[...]
    assert len(q.sharding.device_set) == 8
    if mesh[2] > 1:
        assert "tensor" in str(q.sharding.spec)
    sharded = generate(sharded_model, ps, spec, mesh=m)
    assert sharded.tokens == single.tokens


@needs8
@pytest.mark.parametrize("proposer,strategy", [("ngram", "chain-3"), ("eagle", "3_2_5")])
def test_sharded_speculative_rollout_equals_single_device(proposer, strategy):
    """Speculation on a mesh (rows over data x fsdp, heads over tensor) gives plain decoding's greedy answers."""
    cfg, model = tiny_model()
    c = load_config("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    rng = np.random.RandomState(1)
    ps = [rng.randint(0, 256, 3 + 2 * i).tolist() for i in range(8)]
    spec = RolloutSpec(max_new_tokens=12, chunk_steps=4)
    single = generate(model, ps, spec)
    m = make_mesh(c.mesh)
    drafter = Drafter(cfg, nnx.Rngs(3)) if proposer == "eagle" else None
    speculation = SpeculativeSpec(SpecStrategy.parse(strategy), proposer=proposer)
    sharded = generate(shard_model(model, m), ps, spec, speculation=speculation, drafter=drafter, mesh=m)
    assert sharded.tokens == single.tokens
    assert sharded.accept_len is not None and sharded.accept_len >= 1.0


def test_sharding_rules_match_whole_paths_first_rule_wins():
    m = make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
    assert spec_for("layers.3.self_attn.q_proj.kernel", (64, 64), m) == P("fsdp", "tensor")
    assert spec_for("layers.3.input_layernorm.scale", (64,), m) == P(None)  # the explicit catch-all
    # a whole-path match: a name that merely contains a rule's pattern is not taken by it
    assert spec_for("extra.lm_head.kernel.copy", (64, 64), m) == P(None, None)
    rules = (ShardingRule(r"w", ("fsdp",)), ShardingRule(r"w", ("tensor",)), ShardingRule(r".*", ()))
    assert spec_for("w", (8,), m, rules) == P("fsdp")  # first match wins (the second would give tensor)
    with pytest.raises(ConfigError, match="no sharding rule matches 'bias'"):
        spec_for("bias", (8,), m, PARAM_RULES[:-1])  # no catch-all: a miss is an error, never a silent replica
    # rollout states: caches by row and head, the RNG key replicated, every other leaf by row
    assert spec_for("cache.k.0", (8, 2, 16, 4), m, STATE_RULES) == P(("data", "fsdp"), "tensor", None, None)
    assert spec_for("rng", (2,), m, STATE_RULES) == P(None)
    assert spec_for("num_tokens", (8,), m, STATE_RULES) == P(("data", "fsdp"))


def test_mesh_that_does_not_fit():
    with pytest.raises(ConfigError, match="does not fit the 8 available devices"):
        mesh_shape({"data": 2, "fsdp": 2, "tensor": 4}, 8)
    with pytest.raises(ConfigError, match="do not divide"):
        mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)


def test_training_devices_are_the_first_of_every_process():
    class Dev:
        def __init__(self, i, p):
            self.id, self.process_index = i, p
    devs = [Dev(i, i // 4) for i in range(8)]  # two processes of four devices
    assert [d.id for d in first_local(devs, 1)] == [0, 4]
    assert [d.id for d in first_local(devs, 3)] == [0, 1, 2, 4, 5, 6]
    assert first_local(devs, 0) == devs and first_local(devs, 9) == devs


@needs8
def test_paper_scale_7b_abstract_bytes_per_device():
    c = load_config("qwen2_5_7b", ["mesh.fsdp=4", "mesh.tensor=2"])
    report = inspect_config(c, make_mesh(c.mesh))
    assert report["num_params"] == 7_615_616_512  # Qwen2.5-7B
    per_dev = np.asarray(report["param_bytes_per_device"])
    total = report["num_params"] * 2
    # every weight matrix splits 8 ways; only norms and biases are replicated (tiny)
    assert per_dev.max() < total / 8 * 1.01 and per_dev.sum() >= total
    assert report["kv_cache_gib_per_device_max"] > 0
