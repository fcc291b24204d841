"""Sharding as data: rules that map a pytree leaf's dotted path to mesh axes per dimension.

A rule is (pattern, axes): the pattern must match the whole path (``re.fullmatch``), the first matching rule
wins, and every rule set ends with an explicit catch-all, so no leaf is laid out by accident; a path no rule
matches is an error. A dimension whose size the mesh axis does not divide is replicated instead, and an axis
the mesh lacks is dropped (a rollout replica's (data, tensor) mesh has no fsdp axis), so one rule set fits
every model and every mesh.

Two rule sets: ``PARAM_RULES`` for the policy's parameters (FSDP over the model dimension, tensor parallelism
over heads, FFN and vocabulary) and ``STATE_RULES`` for rollout states (every leaf is per row, split over the
batch axes; KV caches also over the tensor axis by head; the RNG key replicated).
"""

from __future__ import annotations

import re
from typing import Dict, NamedTuple, Sequence, Tuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.core.errors import ConfigError
from tlt_jax.core.trees import path_name
from tlt_jax.models.decoder import abstract_model
from tlt_jax.parallel.mesh import BATCH_AXES


class ShardingRule(NamedTuple):
    pattern: str  # a regular expression matched against the whole dotted path
    axes: Tuple  # per dimension: a mesh axis name, a tuple of names, or None


# FSDP over the model dimension, tensor parallelism over heads / FFN / vocabulary (Megatron-style pairs).
PARAM_RULES: Tuple[ShardingRule, ...] = (
    ShardingRule(r"embed_tokens\.embedding", ("tensor", "fsdp")),  # [V, H]
    ShardingRule(r"lm_head\.kernel", ("fsdp", "tensor")),  # [H, V]
    ShardingRule(r"layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)\.kernel", ("fsdp", "tensor")),  # [H, N*D]
    ShardingRule(r"layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)\.bias", ("tensor",)),
    ShardingRule(r"layers\.\d+\.self_attn\.o_proj\.kernel", ("tensor", "fsdp")),  # [N*D, H]
    ShardingRule(r"layers\.\d+\.mlp\.(gate_proj|up_proj)\.kernel", ("fsdp", "tensor")),  # [H, F]
    ShardingRule(r"layers\.\d+\.mlp\.down_proj\.kernel", ("tensor", "fsdp")),  # [F, H]
    ShardingRule(r".*", ()),  # catch-all: norms and anything else replicated
)

# Rollout states (plain and speculative): per-row leaves over the batch axes.
STATE_RULES: Tuple[ShardingRule, ...] = (
    ShardingRule(r"(cache|dcache)\.(k|v)\.\d+", (BATCH_AXES, "tensor")),  # [B, KV heads, S, D]
    ShardingRule(r"rng", ()),  # the state's RNG key: one for the batch
    ShardingRule(r".*", (BATCH_AXES,)),  # catch-all: every other leaf is per row ([B, ...])
)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[n] for n in names]))


def _present(axis, mesh: Mesh):
    """``axis`` (a name or a tuple of names) restricted to the mesh's axes; None if none is there."""
    if axis is None:
        return None
    names = tuple(n for n in (axis if isinstance(axis, tuple) else (axis,)) if n in mesh.shape)
    if not names:
        return None
    return names if isinstance(axis, tuple) else names[0]


def fit_spec(shape: Sequence[int], axes: Sequence, mesh: Mesh) -> P:
    """PartitionSpec for ``shape`` from per-dim axes, replicating dims the axes do not divide. Axes the mesh does
    not have are dropped (a rollout replica's (data, tensor) mesh has no fsdp axis)."""
    axes = tuple(_present(a, mesh) for a in axes) + (None,) * (len(shape) - len(axes))
    out = []
    for dim, axis in zip(shape, axes[: len(shape)]):
        size = _axis_size(mesh, axis)
        out.append(axis if axis is not None and size > 1 and dim % size == 0 else None)
    return P(*out)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[ShardingRule] = PARAM_RULES) -> P:
    """The PartitionSpec of the first rule whose pattern matches the whole ``path``."""
    for rule in rules:
        if re.fullmatch(rule.pattern, path):
            return fit_spec(shape, rule.axes, mesh)
    raise ConfigError(f"no sharding rule matches {path!r}; end the rule set with an explicit catch-all "
                      f"ShardingRule(r'.*', ())")


def param_shardings(cfg, mesh: Mesh, rules: Sequence[ShardingRule] = PARAM_RULES) -> Dict[str, NamedSharding]:
    """Path -> NamedSharding for every parameter of the model described by ``cfg`` (no allocation)."""
    _, state = nnx.split(abstract_model(cfg))
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = path_name(path)
        out[name] = NamedSharding(mesh, spec_for(name, leaf.shape, mesh, rules))
    return out


def shard_model(model, mesh: Mesh, rules: Sequence[ShardingRule] = PARAM_RULES):
    """Places an existing model's parameters on the mesh (returns a new module)."""
    graphdef, state = nnx.split(model)
    shard = param_shardings(model.cfg, mesh, rules)
    state = jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(x, shard[path_name(p)]), state)
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Leading (batch) dimension over the data and fsdp axes, the rest replicated."""
    return NamedSharding(mesh, fit_spec(shape, (BATCH_AXES,), mesh))


def cache_shardings(cfg, mesh: Mesh, batch: int, max_len: int) -> NamedSharding:
    """Sharding of each [B, KVH, S, D] cache array (``STATE_RULES``): batch over data x fsdp, KV heads over
    tensor."""
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return NamedSharding(mesh, spec_for("cache.k.0", shape, mesh, STATE_RULES))


def bytes_per_device(abstract_tree, shardings) -> np.ndarray:
    """Bytes held by each device for arrays (ShapeDtypeStruct) laid out with matching shardings."""
    leaves = jax.tree_util.tree_leaves(abstract_tree)
    shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(leaves) != len(shards):
        raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings")
    devices = list(shards[0].mesh.devices.flat) if shards else []
    index = {d: i for i, d in enumerate(devices)}
    total = np.zeros(len(devices), np.int64)
    for leaf, sh in zip(leaves, shards):
        nbytes = int(np.prod(sh.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        for d in sh.addressable_devices if hasattr(sh, "addressable_devices") else devices:
            total[index[d]] += nbytes
    return total


# ------------------------------------------------------------------------------------------ trees on a mesh


def tree_shardings(state, mesh: Mesh, rules: Sequence[ShardingRule] = PARAM_RULES):
    """A tree of NamedShardings matching ``state`` (an nnx.State of parameters, or a rollout state with
    ``STATE_RULES``), laid out by ``rules``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_name(p), np.shape(x), mesh, rules)), state)


def opt_state_shardings(opt_state, params, param_shards, mesh: Mesh):
    """Shardings for an optax state: every sub-tree shaped like the parameters (Adam's moments, ...) takes the
    parameters' shardings; everything else (step counts, scalars) is replicated."""
    ptree = jax.tree.structure(params)
    replicated = NamedSharding(mesh, P())

    def is_param_like(x) -> bool:
        try:
            return jax.tree.structure(x) == ptree
        except Exception:  # noqa: BLE001 - odd leaves are simply not parameter-shaped
            return False

    return jax.tree.map(lambda x: param_shards if is_param_like(x) else replicated, opt_state, is_leaf=is_param_like)


def to_global(x, sharding: NamedSharding) -> jax.Array:
    """A host value (the same on every process) as one array laid out by ``sharding``, which may span devices of
    several processes: each process fills only its own shards."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def tree_to_global(tree, shardings):
    """``to_global`` on every leaf (``shardings`` is a matching tree of shardings)."""
    return jax.tree.map(lambda x, s: to_global(x, s), tree, shardings)


def to_host(x) -> np.ndarray:
    """The whole value of an array on every process (an all-gather when its shards live on several processes)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_mesh(tree, shardings):
    """Moves arrays (e.g. the training-mesh parameters) onto ``shardings`` (one, or a matching tree), whose
    devices all belong to this process (a rollout replica). Arrays spread over several processes are all-gathered
    first."""
    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = to_host(x)
        return jax.device_put(x, s)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)
