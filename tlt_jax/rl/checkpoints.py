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

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.core.errors import CheckpointError
from tlt_jax.io import checkpoint
from tlt_jax.parallel.sharding import to_global, to_host

FORMAT = "tlt_jax.grpo_trainer.v1"
CHECKPOINT_DIR = "checkpoints"
OWN_DRAFTER_DIR = "drafter"
METRICS_FILE = "metrics.jsonl"
REPLICATED_ITEMS = ("drafter", "drafter_opt")  # whole on every process


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


def metrics_path(workdir: str) -> str:
    """The run's ``metrics.jsonl``: one JSON object per RL step, and ``{"step": N, "eval": summary}`` rows."""
    return os.path.join(workdir, METRICS_FILE)


def read_metrics(path: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(training rows, evaluation rows) of a run's metrics file (``metrics_path``), in file order; empty lists when
    the file does not exist yet."""
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def own_drafter_dir(workdir: str) -> str:
    """Where a run that had no warmed drafter keeps the one its short warm-up made (``tlt.warmup_at_start``)."""
    return os.path.join(workdir, OWN_DRAFTER_DIR)


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


def read_meta(workdir: str, step: Optional[int] = None) -> Tuple[int, Dict[str, Any]]:
    """(step, metadata) of a checkpoint (default: the newest), checked to be an RL run's."""
    step, meta = checkpoint.read_metadata(checkpoint_dir(workdir), step)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint_dir(workdir)} step {step} is not a trainer checkpoint")
    return step, meta


def resolve(path: str, step: Optional[int] = None) -> Tuple[str, int]:
    """(run work dir, checkpoint step) of ``path``: a run's work dir, its ``checkpoints`` dir, or one step's dir
    in it (its number is the step; ``step`` must then be None or the same); ``step`` None: the newest."""
    path = os.path.abspath(os.path.expanduser(path))
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name.isdigit() and os.path.basename(parent) == CHECKPOINT_DIR:
        if step is not None and int(step) != int(name):
            raise CheckpointError(f"{path} is step {name}'s checkpoint, not step {step}'s")
        path, step = os.path.dirname(parent), int(name)
    elif name == CHECKPOINT_DIR and not os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        path = parent
    if not os.path.isdir(checkpoint_dir(path)):
        raise CheckpointError(f"no run checkpoints at {path} (expected a work dir with {CHECKPOINT_DIR}/, that "
                              f"dir, or one step's dir in it)")
    if step is None:
        step = latest_step(path)
        if step is None:
            raise CheckpointError(f"{checkpoint_dir(path)} holds no complete checkpoint")
    elif not os.path.isdir(os.path.join(checkpoint_dir(path), str(step))):
        have = sorted(int(n) for n in os.listdir(checkpoint_dir(path)) if n.isdigit())
        raise CheckpointError(f"{checkpoint_dir(path)} has no step {step}; it has {have}")
    return path, int(step)


def check_matches(workdir: str, step: int, name: str, tree, meta: Mapping[str, Any], config_name: str = "") -> None:
    """A CheckpointError unless item ``name`` of the checkpoint (``meta``: its metadata, :func:`read_meta`) holds
    arrays of the shapes and dtypes of ``tree``'s leaves (a checkpoint of another model or drafter), naming the
    first difference."""
    stored = checkpoint.item_shapes(checkpoint_dir(workdir), name, step)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    live = {f"{i:05d}": (tuple(np.shape(x)), np.dtype(x.dtype).name) for i, x in enumerate(jax.tree.leaves(tree))}
    where = f"{checkpoint_dir(workdir)}/{step} (written by config {meta.get('config_name')!r})"
    here = f"config {config_name!r}" if config_name else "this model"
    if len(stored) != len(live):
        raise CheckpointError(f"{where} holds {len(stored)} {name} arrays, {here} has {len(live)}: it is a "
                              f"checkpoint of another model")
    for i, key in enumerate(sorted(live)):
        if stored.get(key) != live[key]:
            (s_shape, s_dtype), (l_shape, l_dtype) = stored.get(key, ((), "missing")), live[key]
            raise CheckpointError(f"{where} is a checkpoint of another model: {name} array {paths[i]} is "
                                  f"{s_dtype}{list(s_shape)} there and {l_dtype}{list(l_shape)} in {here}")


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
