"""Pytree paths as dotted names: 'layers.0.self_attn.q_proj.kernel', 'cache.k.3'."""

from __future__ import annotations


def path_name(path) -> str:
    """The dotted name of a pytree key path (``jax.tree_util`` keys: dict keys, attributes, sequence indices);
    a trailing 'value' (an NNX variable's own field) is dropped."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name is None:
            name = str(k)
        parts.append(str(name))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return ".".join(parts)
