"""orbax-checkpoint helpers: numbered steps of named pytrees plus a JSON metadata item.

Every checkpoint the project writes goes through here. A step is written atomically by orbax (a temporary
directory renamed on success), so a crash never leaves a half-written step that looks complete.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import orbax.checkpoint as ocp

from tlt_jax.errors import CheckpointError

META = "meta"


def _manager(directory: str, max_to_keep: Optional[int] = None, create: bool = True) -> ocp.CheckpointManager:
    directory = os.path.abspath(os.path.expanduser(directory))
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(directory, options=opts)


def save(directory: str, step: int, items: Mapping[str, Any], metadata: Mapping[str, Any], *,
         max_to_keep: Optional[int] = None, replace: bool = False) -> str:
    """Writes ``items`` (name -> pytree of arrays) and ``metadata`` (JSON) as ``directory/<step>``.

    ``replace``: the directory holds one artefact, not a history: earlier steps are deleted first (a rerun
    that ends at a lower step must not leave an older, higher step to be found as the latest).
    """
    if META in items:
        raise ValueError(f"item name {META!r} is reserved for metadata")
    mngr = _manager(directory, max_to_keep)
    if replace:
        for old in mngr.all_steps():
            mngr.delete(old)
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    args[META] = ocp.args.JsonSave(dict(metadata))
    mngr.save(step, args=ocp.args.Composite(**args), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return os.path.join(os.path.abspath(os.path.expanduser(directory)), str(step))


def latest_step(directory: str) -> Optional[int]:
    if not os.path.isdir(os.path.expanduser(directory)):
        return None
    mngr = _manager(directory, create=False)
    step = mngr.latest_step()
    mngr.close()
    return step


def read_metadata(directory: str, step: Optional[int] = None) -> Tuple[int, Dict[str, Any]]:
    step = _resolve_step(directory, step)
    mngr = _manager(directory, create=False)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    finally:
        mngr.close()
    return step, dict(out[META])


def restore(directory: str, abstract_items: Mapping[str, Any], step: Optional[int] = None
            ) -> Tuple[int, Dict[str, Any], Dict[str, Any]]:
    """Reads the named pytrees (shaped like ``abstract_items``) and the metadata of a step (default: latest).

    Returns (step, items, metadata).
    """
    step = _resolve_step(directory, step)
    mngr = _manager(directory, create=False)
    args = {k: ocp.args.StandardRestore(v) for k, v in abstract_items.items()}
    args[META] = ocp.args.JsonRestore()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory} step {step} does not match the expected structure: {e}")
    finally:
        mngr.close()
    items = {k: out[k] for k in abstract_items}
    return step, items, dict(out[META])


def _resolve_step(directory: str, step: Optional[int]) -> int:
    if not os.path.isdir(os.path.expanduser(directory)):
        raise CheckpointError(f"no checkpoint directory at {directory}")
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise CheckpointError(f"no complete checkpoint step in {directory}")
    return int(step)
