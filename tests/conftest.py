"""Test setup: 8 fake CPU devices (for sharding tests) on the CPU platform, offline hub, float32 matmuls at full
precision."""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# the suite runs on the CPU; libtpu (the tpu extra) only compiles, and would otherwise look for a chip at start-up
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

_HEAVY_MARKERS = ("slow", "multihost", "resume", "lossless")


def pytest_collection_modifyitems(config, items):
    """Modules with heavy tests (markers slow / multihost / resume / lossless) run first, the rest keep their
    order: with ``-n 2 --dist loadscope`` (the README's command) the long modules then start early instead of
    forming the tail."""
    heavy = {item.module.__name__ for item in items
             if item.module is not None and any(item.get_closest_marker(m) for m in _HEAVY_MARKERS)}
    items.sort(key=lambda item: item.module is None or item.module.__name__ not in heavy)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each module, drop JAX's caches of traced and compiled programs and collect the garbage: a test
    worker runs many modules in one process, and their executables and buffers (8 devices' worth) would
    otherwise pile up for the whole run."""
    yield
    jax.clear_caches()
    gc.collect()
