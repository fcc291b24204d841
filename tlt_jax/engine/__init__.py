"""The adaptive rollout engine: batch compaction, speculation on demand, BEG-MAB and a program pool."""

from tlt_jax.engine.adaptive import AdaptiveEngine, EngineConfig
from tlt_jax.engine.bandit import BucketBandit
from tlt_jax.engine.pool import ProgramPool

__all__ = ["AdaptiveEngine", "EngineConfig", "BucketBandit", "ProgramPool"]
