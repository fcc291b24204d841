"""BEG-MAB: a bucketed epsilon-greedy multi-armed bandit that picks the speculation strategy.

Each batch-size bucket has its own arms (strategies, e.g. ``plain``, ``chain-2``, ``4_2_8``). The reward of a
pull is the committed tokens per second of one chunk. An arm's value is the *median* of its last ``window``
rewards (robust to the odd slow chunk on a shared machine). ``choose`` first tries every arm of the bucket
``min_pulls`` times (round robin), then explores a random arm with probability ``epsilon`` and otherwise exploits
the best value.

The bandit is deterministic given its seed and the sequence of updates, so processes that feed it the same
(gathered) rewards take the same decisions.
"""

from __future__ import annotations

import collections
from typing import Deque, Dict, List, Mapping, Sequence

import numpy as np

from tlt_jax.core.errors import ConfigError
from tlt_jax.core.seeds import numpy_stream


class BucketBandit:
    def __init__(self, arms: Mapping[int, Sequence[str]], epsilon: float = 0.1, window: int = 8, seed: int = 0,
                 min_pulls: int = 2):
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ConfigError(f"bandit epsilon must be in [0, 1], got {epsilon}")
        if int(window) < 1:
            raise ConfigError(f"bandit window must be >= 1, got {window}")
        if not arms:
            raise ConfigError("the bandit needs at least one bucket")
        self.arms: Dict[int, List[str]] = {}
        for bucket, names in arms.items():
            names = list(names)
            if not names or len(set(names)) != len(names):
                raise ConfigError(f"bucket {bucket}: arms must be a non-empty list of distinct names, got {names}")
            self.arms[int(bucket)] = names
        self.epsilon = float(epsilon)
        self.window = int(window)
        self.min_pulls = max(1, min(int(min_pulls), self.window))
        self._rng = numpy_stream(int(seed), "bandit")
        self._rewards: Dict[int, Dict[str, Deque[float]]] = {
            b: {a: collections.deque(maxlen=self.window) for a in names} for b, names in self.arms.items()}
        self.pulls: Dict[int, Dict[str, int]] = {b: {a: 0 for a in names} for b, names in self.arms.items()}
        self.explored = 0

    def _check(self, bucket: int, arm: str = None) -> None:
        if bucket not in self.arms:
            raise KeyError(f"bucket {bucket} has no arms (buckets: {sorted(self.arms)})")
        if arm is not None and arm not in self._rewards[bucket]:
            raise KeyError(f"bucket {bucket} has no arm {arm!r} (arms: {self.arms[bucket]})")

    def value(self, bucket: int, arm: str) -> float:
        """Median of the arm's recent rewards (NaN before its first pull)."""
        self._check(bucket, arm)
        r = self._rewards[bucket][arm]
        return float(np.median(np.asarray(r))) if r else float("nan")

    def best(self, bucket: int) -> str:
        """The arm with the highest value (ties and untried arms: the first listed)."""
        self._check(bucket)
        vals = [self.value(bucket, a) for a in self.arms[bucket]]
        vals = [-np.inf if np.isnan(v) else v for v in vals]
        return self.arms[bucket][int(np.argmax(vals))]

    def choose(self, bucket: int) -> str:
        self._check(bucket)
        names = self.arms[bucket]
        tries = [len(self._rewards[bucket][a]) for a in names]
        if min(tries) < self.min_pulls:
            return names[int(np.argmin(tries))]
        # The random draws happen whatever the outcome, so the stream stays aligned across processes.
        u, pick = self._rng.random(), int(self._rng.integers(len(names)))
        if len(names) > 1 and u < self.epsilon:
            self.explored += 1
            return names[pick]
        return self.best(bucket)

    def update(self, bucket: int, arm: str, reward: float) -> None:
        self._check(bucket, arm)
        reward = float(reward)
        if not np.isfinite(reward):
            return
        self._rewards[bucket][arm].append(reward)
        self.pulls[bucket][arm] += 1

    def summary(self) -> Dict[str, Dict[str, Dict[str, float]]]:
        """{bucket: {arm: {'pulls', 'value'}}} (JSON-friendly)."""
        return {str(b): {a: {"pulls": self.pulls[b][a], "value": self.value(b, a)} for a in names}
                for b, names in self.arms.items()}
