"""Named random streams: every seed the package derives comes from here.

A stream is named by a string and indexed by integers (the RL step, the replica, the epoch), and its seed is a
hash of (base seed, name, indices): streams of different names never collide, and a run resumed at step ``s``
draws exactly what an uninterrupted run draws at step ``s``.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stream_seed(base: int, name: str, *index: int) -> int:
    """A non-negative 31-bit seed for the stream ``name`` at ``index`` under the run's ``base`` seed."""
    text = repr((int(base), str(name)) + tuple(int(i) for i in index)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little") & 0x7FFFFFFF


def numpy_stream(base: int, name: str, *index: int) -> np.random.Generator:
    """A numpy Generator for the stream (host-side draws: prompt order, mini-batch order, buffer samples)."""
    return np.random.default_rng(stream_seed(base, name, *index))
