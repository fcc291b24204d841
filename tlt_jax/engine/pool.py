"""A bounded pool of compiled rollout programs, one per (bucket, strategy).

Every shape a strategy or a batch bucket fixes is static, so each (bucket, arm) pair is its own XLA program.
The pool compiles them ahead of time (``jit(...).lower(abstract args).compile()``), keeps at most
``max_programs`` (least recently used evicted) and counts compiles and compile seconds, so a run can report
how much it paid for its programs.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Dict, Hashable

from tlt_jax.errors import ConfigError


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

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._programs

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The compiled program for ``key``, built (and timed) by ``build()`` on a miss."""
        if key in self._programs:
            self._programs.move_to_end(key)
            self.hits += 1
            return self._programs[key]
        t0 = time.perf_counter()
        prog = build()
        self.compile_s += time.perf_counter() - t0
        self.compiles += 1
        self._programs[key] = prog
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
            self.evictions += 1
        return prog

    def stats(self) -> Dict[str, float]:
        return {"programs": len(self._programs), "compiles": self.compiles, "compile_s": self.compile_s,
                "evictions": self.evictions, "hits": self.hits}
