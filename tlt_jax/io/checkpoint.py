"""orbax-checkpoint helpers: numbered steps of named pytrees plus a JSON metadata item.

Every checkpoint the project writes goes through here. A step is written atomically by orbax (a temporary
directory renamed on success), so a crash never leaves a half-written step that looks complete. Before writing,
the free disk space is checked against the checkpoint's size; a write that still fails (disk full, quota, file
size limit) is a CheckpointError that names the step left intact.

Fault injection for tests: with ``TLT_KILL_DURING_SAVE=<step>`` in the environment the process kills itself
(SIGKILL) after orbax has started writing that step and before it has finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import signal
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from tlt_jax.core.errors import CheckpointError

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
    directory = os.path.abspath(os.path.expanduser(directory))
    previous = latest_step(directory)
    kept = f"the previous checkpoint (step {previous}) is intact" if previous is not None else "no earlier step"
    need = tree_nbytes(items)
    free = disk_free_bytes(directory)
    if need + need // 20 + (1 << 20) > free:
        raise CheckpointError(f"not enough disk space to write checkpoint step {step} to {directory}: it needs "
                              f"~{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; {kept}")
    mngr = _manager(directory, max_to_keep)
    try:
        if replace:
            for old in mngr.all_steps():
                mngr.delete(old)
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        args[META] = ocp.args.JsonSave(dict(metadata))
        mngr.save(step, args=ocp.args.Composite(**args), force=True)
        if os.environ.get("TLT_KILL_DURING_SAVE") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore wrap OS errors in several types
        for tmp in glob.glob(os.path.join(directory, f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the step was never complete
        raise CheckpointError(f"writing checkpoint step {step} to {directory} failed "
                              f"({_describe_write_error(e)}); {kept}") from e
    finally:
        try:
            mngr.close()
        except Exception:  # noqa: BLE001 - the write error above is the one to report
            pass
    return os.path.join(directory, str(step))


def tree_nbytes(items: Any) -> int:
    return int(sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(items)
                   if hasattr(x, "dtype")))


def disk_free_bytes(path: str) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _describe_write_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain:
            break
        chain.append(nxt)
    codes = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
    full = any(getattr(x, "errno", None) in codes for x in chain) or any(
        s in str(x) for x in chain for s in ("No space left", "quota exceeded", "File too large"))
    return ("the disk is full or a size limit was hit: " + text) if full else text


def latest_step(directory: str) -> Optional[int]:
    """The newest complete step in ``directory`` (None if there is none). Read from the file system alone: orbax
    writes a step under a temporary name and renames it when complete, so every ``<int>`` directory is complete.
    (No CheckpointManager here: in a multi-process job its constructor is a collective, and a process that sees
    no directory yet must not skip it while another one enters it.)"""
    directory = os.path.expanduser(directory)
    if not os.path.isdir(directory):
        return None
    steps = [int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
    return max(steps) if steps else None


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
        with _quiet():  # a restore of some of the items (an evaluation reads the policy alone)
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


@contextlib.contextmanager
def _quiet():
    """orbax logs a warning for every other item of a step when a manager reads one item: hide them."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _item_tree(mngr: ocp.CheckpointManager, directory: str, name: str, step: int) -> Dict[str, Any]:
    meta = mngr.item_metadata(step).get(name)
    if meta is None:
        raise CheckpointError(f"checkpoint {directory} step {step} has no item {name!r}")
    return dict(getattr(meta, "tree", meta))


def item_shapes(directory: str, name: str, step: Optional[int] = None) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{key: (shape, dtype name)} of a flat item of a checkpoint, read from its metadata (no array is read)."""
    step = _resolve_step(directory, step)
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.expanduser(directory)),
                                 item_handlers={name: ocp.StandardCheckpointHandler()})
    try:
        with _quiet():
            tree = _item_tree(mngr, directory, name, step)
    finally:
        mngr.close()
    return {k: (tuple(m.shape), np.dtype(m.dtype).name) for k, m in tree.items()}


def read_host_arrays(directory: str, name: str, step: Optional[int] = None) -> Tuple[int, Dict[str, np.ndarray]]:
    """One item of a checkpoint as host (numpy) arrays, whatever devices or processes wrote it: for analysis and
    comparisons, no model needed. Returns (step, {key: array}) for a flat item such as the trainer's."""
    step = _resolve_step(directory, step)
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.expanduser(directory)),
                                 item_handlers={name: ocp.StandardCheckpointHandler()})
    try:
        with _quiet():
            target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), _item_tree(mngr, directory, name, step))
            out = mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(target)}))
    finally:
        mngr.close()
    return step, dict(out[name])
