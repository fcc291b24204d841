"""A bounded pool of compiled rollout programs, one per (bucket, strategy).

Every shape a strategy or a batch bucket fixes is static, so each (bucket, arm) pair is its own XLA program.
The pool compiles them ahead of time (``jit(...).lower(abstract args).compile()``), keeps at most
``max_programs`` (least recently used evicted) and counts compiles and compile seconds, so a run can report
how much it paid for its programs.

Replicas on different devices run the same program: the first replica's executable is compiled, the others
get a copy relocated to their devices (``relocate``: the serialized executable loaded with another device
assignment; about a second for the 135M model's chunk, against 7-9 s to compile it). Where relocation is not
possible (or the persistent compilation cache is on, which then serves every replica from the second run on)
the program is compiled.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import time
from typing import Any, Callable, Dict, Hashable, Optional, Sequence

import jax
import numpy as np

from tlt_jax.core.errors import ConfigError


class ProgramPool:
    def __init__(self, max_programs: int = 32):
        if int(max_programs) < 1:
            raise ConfigError(f"the program pool needs room for at least one program, got {max_programs}")
        self.max_programs = int(max_programs)
        self._programs: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
        self.compiles = 0
        self.compile_s = 0.0
        self.evictions = 0
        self.hits = 0
        self.relocations = 0
        self.relocate_s = 0.0
        self._derived: set = set()  # keys whose program came from ``derive`` (a relocated copy), not a compile

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._programs

    def peek(self, key: Hashable) -> Any:
        """The program for ``key`` if the pool holds it (no hit counted, no recency change), else None."""
        return self._programs.get(key)

    def compiled(self, key: Hashable) -> Any:
        """Like ``peek``, but only a program this pool compiled itself: a relocated copy is never the source
        of another relocation, so every serialized executable is one XLA compiled in this process (a test worker
        once aborted inside the serialization, cause not found; this keeps relocation on its tested path)."""
        return None if key in self._derived else self._programs.get(key)

    def get(self, key: Hashable, build: Callable[[], Any], derive: Optional[Callable[[], Any]] = None) -> Any:
        """The compiled program for ``key``. On a miss, ``derive()`` (e.g. another replica's program relocated;
        None when it cannot) is tried first, then ``build()``; both are timed and counted apart."""
        if key in self._programs:
            self._programs.move_to_end(key)
            self.hits += 1
            return self._programs[key]
        t0 = time.perf_counter()
        prog = derive() if derive is not None else None
        if prog is not None:
            self.relocate_s += time.perf_counter() - t0
            self.relocations += 1
            self._derived.add(key)
        else:
            t0 = time.perf_counter()
            prog = build()
            self.compile_s += time.perf_counter() - t0
            self.compiles += 1
            self._derived.discard(key)
        self._programs[key] = prog
        while len(self._programs) > self.max_programs:
            old, _ = self._programs.popitem(last=False)
            self._derived.discard(old)
            self.evictions += 1
        return prog

    def stats(self) -> Dict[str, float]:
        return {"programs": len(self._programs), "compiles": self.compiles, "compile_s": self.compile_s,
                "relocations": self.relocations, "relocate_s": self.relocate_s, "evictions": self.evictions,
                "hits": self.hits}


class _Relocating(pickle.Unpickler):
    """Loads a serialized ``jax.stages.Compiled`` with device ``src[i]`` replaced by ``dst[i]``."""

    def __init__(self, data: bytes, src: Sequence[jax.Device], dst: Sequence[jax.Device], options):
        super().__init__(io.BytesIO(data))
        from jax._src.lib import xla_client

        self._map = {s.id: d for s, d in zip(src, dst)}
        self._client = dst[0].client
        self._devices = xla_client.DeviceList(tuple(dst))
        self._options = options

    def persistent_load(self, pid):
        kind = pid[0]
        if kind == "exec":
            return self._client.deserialize_executable(pid[1], self._devices, self._options)
        if kind == "device":
            return self._map[pid[1]]
        if kind == "client":
            return self._client
        raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")


def relocate(compiled, src: Sequence[jax.Device], dst: Sequence[jax.Device]):
    """``compiled`` (a ``jax.stages.Compiled`` whose device assignment is ``src``, in the mesh's flat order) as
    an executable on ``dst`` (same count, same platform), without compiling; None when that fails (an
    executable that cannot be serialized, a JAX whose internals differ): the caller then compiles."""
    src, dst = list(src), list(dst)
    if len(src) != len(dst) or not dst or src[0].platform != dst[0].platform:
        return None
    if jax.config.jax_compilation_cache_dir:
        # An executable loaded from the persistent compilation cache does not survive a second serialization
        # (on CPU it loads, then fails at run time with a missing function). With the cache on, each replica
        # compiles once and later runs load every replica's program from the cache.
        return None
    try:
        from jax._src import compiler
        from jax.experimental import serialize_executable

        data, in_tree, out_tree = serialize_executable.serialize(compiled)
        options = compiler.get_compile_options(num_replicas=1, num_partitions=len(dst),
                                               device_assignment=np.asarray([d.id for d in dst]).reshape(1, -1),
                                               backend=dst[0].client)
        unloaded, args_info, no_kwargs = _Relocating(data, src, dst, options).load()
        return jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info), out_tree, no_kwargs=no_kwargs)
    except Exception as e:  # any failure falls back to compiling
        logging.getLogger(__name__).info("relocating a compiled program failed (%s: %s); compiling instead",
                                         type(e).__name__, e)
        return None
