"""Drafter checkpoints: only the drafter's own weights (and draft vocabulary), tagged with its target.

The metadata records the target's shape and a fingerprint of its embedding, so a drafter is never loaded
against another model by mistake.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.io import checkpoint
from tlt_jax.core.errors import CheckpointError
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.decoder import Decoder
from tlt_jax.models.drafter import Drafter

FORMAT = "tlt_jax.eagle_drafter.v1"
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "head_dim", "qkv_bias", "rope_theta")


def target_fingerprint(target: Decoder) -> Dict[str, Any]:
    """Shape fields plus a checksum of the first embedding rows (tells two same-shaped models apart)."""
    emb = np.asarray(jax.device_get(target.embed_tokens.embedding[...][:64]), np.float64)
    return {"shape": {f: getattr(target.cfg, f) for f in _SHAPE_FIELDS},
            "embed_checksum": float(np.abs(emb).sum()), "embed_rows": int(emb.shape[0])}


def check_target(meta: Dict[str, Any], target: Decoder, where: str = "") -> None:
    fp = meta.get("target")
    if not fp:
        raise CheckpointError(f"drafter checkpoint {where} has no target fingerprint")
    mine = target_fingerprint(target)
    diff = [f"{k}: drafter's {fp['shape'].get(k)!r} vs target {v!r}" for k, v in mine["shape"].items()
            if fp["shape"].get(k) != v]
    if diff:
        raise CheckpointError(f"drafter checkpoint {where} was trained for another target ({'; '.join(diff)})")
    a, b = fp["embed_checksum"], mine["embed_checksum"]
    if abs(a - b) > 1e-3 * max(1.0, abs(b)):
        raise CheckpointError(f"drafter checkpoint {where} was trained for another target of the same shape "
                              f"(embedding checksum {a:.6g} vs {b:.6g})")


def save_drafter(directory: str, drafter: Drafter, target: Decoder, *, step: int = 0,
                 extra: Optional[Dict[str, Any]] = None, replace: bool = False) -> str:
    """Saves the drafter's own weights and draft vocabulary as ``directory/<step>``; ``replace`` deletes the
    directory's earlier steps first (the warm-up's drafter supersedes the previous one)."""
    params = nnx.to_pure_dict(nnx.state(drafter, nnx.Param))
    items = {"params": params}
    vocab = None if drafter.vocab_ids is None else np.asarray(drafter.vocab_ids[...])
    if vocab is not None:
        items["vocab"] = {"ids": vocab}
    meta = {"format": FORMAT, "target": target_fingerprint(target),
            "draft_vocab_size": None if vocab is None else int(vocab.shape[0]),
            "param_dtype": drafter.cfg.param_dtype, "extra": extra or {}}
    return checkpoint.save(directory, step, items, meta, replace=replace)


def load_drafter(directory: str, target: Decoder, *, step: Optional[int] = None) -> Tuple[Drafter, Dict[str, Any]]:
    """Restores a drafter for ``target`` (CheckpointError if it was trained for another model)."""
    step, meta = checkpoint.read_metadata(directory, step)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a drafter checkpoint (format {meta.get('format')!r})")
    check_target(meta, target, directory)
    cfg: ModelConfig = target.cfg
    n = meta.get("draft_vocab_size")
    vocab = None if n is None else np.zeros((n,), np.int32)
    abstract = nnx.eval_shape(lambda: Drafter(cfg, nnx.Rngs(0), draft_vocab=vocab))
    want = {"params": nnx.to_pure_dict(nnx.state(abstract, nnx.Param))}
    if n is not None:
        want["vocab"] = {"ids": jax.ShapeDtypeStruct((n,), jnp.int32)}
    _, items, _ = checkpoint.restore(directory, want, step)
    drafter = Drafter(cfg, nnx.Rngs(0), draft_vocab=None if n is None else np.asarray(items["vocab"]["ids"]))
    state = nnx.state(drafter, nnx.Param)
    nnx.replace_by_pure_dict(state, items["params"])
    nnx.update(drafter, state)
    return drafter, meta
