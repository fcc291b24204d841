"""The RL run's checkpoint layout, in one place.

``<workdir>/checkpoints/<step>/`` (written by ``io.checkpoint``, atomically) holds the items

    policy       the policy parameters, as laid out on the training mesh (each process writes its shards)
    opt          the policy's optimizer state, laid out like the parameters
    drafter      the drafter's own parameters (with a drafter), saved replicated
    drafter_opt  the drafter's optimizer state (with spot training), saved replicated

each a flat ``{'00000': leaf, ...}`` dict of the pytree's leaves in order (orbax-friendly whatever the container
types), and a JSON metadata item: ``format``, ``step``, ``data_pos``, ``seed``, ``config_name``, ``drafter``,
``drafter_updates``, ``drafter_warm``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.core.errors import CheckpointError
from tlt_jax.io import checkpoint
from tlt_jax.parallel.sharding import to_global, to_host

FORMAT = "tlt_jax.grpo_trainer.v1"
CHECKPOINT_DIR = "checkpoints"
REPLICATED_ITEMS = ("drafter", "drafter_opt")  # whole on every process


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


def flatten(tree) -> Dict[str, Any]:
    """A pytree as a flat {'00000': leaf} dict."""
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def unflatten(like, flat: Mapping[str, Any]):
    """Inverse of :func:`flatten`, shaped like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    if len(flat) != len(leaves):
        raise CheckpointError(f"checkpoint holds {len(flat)} arrays where {len(leaves)} are expected")
    return jax.tree.unflatten(treedef, [flat[f"{i:05d}"] for i in range(len(leaves))])


def _abstract(flat: Mapping[str, Any]) -> Dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and (for arrays) shardings: orbax restores each array laid out as the live one is."""
    return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in flat.items()}


def _items(trees: Mapping[str, Any], mesh: Mesh) -> Dict[str, Dict[str, Any]]:
    rep = NamedSharding(mesh, P())
    items = {}
    for name, tree in trees.items():
        flat = flatten(tree)
        if name in REPLICATED_ITEMS:
            flat = {k: to_global(x, rep) for k, x in flat.items()}
        items[name] = flat
    return items


def save(workdir: str, step: int, trees: Mapping[str, Any], meta: Mapping[str, Any], mesh: Mesh, *,
         keep: int) -> str:
    """Writes the named pytrees (``policy``, ``opt`` and the optional drafter items) as step ``step``."""
    meta = dict(meta, format=FORMAT, step=int(step))
    return checkpoint.save(checkpoint_dir(workdir), step, _items(trees, mesh), meta, max_to_keep=keep)


def read_meta(workdir: str) -> Tuple[int, Dict[str, Any]]:
    """(step, metadata) of the newest checkpoint, checked to be an RL run's."""
    step, meta = checkpoint.read_metadata(checkpoint_dir(workdir))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint_dir(workdir)} step {step} is not a trainer checkpoint")
    return step, meta


def latest_step(workdir: str) -> Optional[int]:
    return checkpoint.latest_step(checkpoint_dir(workdir))


def restore(workdir: str, like: Mapping[str, Any], mesh: Mesh, step: int) -> Dict[str, Any]:
    """The named pytrees of step ``step``, shaped and laid out like ``like`` (the live ones); the replicated
    items come back as local arrays."""
    want = {k: _abstract(flat) for k, flat in _items(like, mesh).items()}
    _, items, _ = checkpoint.restore(checkpoint_dir(workdir), want, step)
    out = {}
    for name, tree in like.items():
        flat = items[name]
        if name in REPLICATED_ITEMS:
            flat = {n: jnp.asarray(to_host(x)) for n, x in flat.items()}
        out[name] = unflatten(tree, flat)
    return out
