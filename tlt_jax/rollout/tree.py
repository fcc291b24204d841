"""Speculation strategies and draft-tree shapes.

A strategy fixes the tree's shape statically (one compiled program per strategy):

* ``depth`` D: draft tokens on the longest path;
* ``top_k`` K: children proposed per expanded node (K = 1 is a chain);
* ``num_verify`` V: tokens the target scores in one forward, the committed root included (V - 1 draft nodes).

A draft tree is described per row by ``tokens [B, V]`` (node 0 is the root: the last committed token, not
yet in the target's cache), ``parents [B, V]`` (tree index of each node's parent; -1 for the root, -2 for a
node that must never be followed) and ``depth [B, V]`` (0 for the root). Nodes come in topological order
(parents before children), and the children of one node carry distinct tokens. The sampled acceptance rule also
needs each node's draw order among its siblings (``rank``) and the drafter's distribution at every node
(``draft_logq``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from tlt_jax.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SpecStrategy:
    depth: int
    top_k: int = 1
    num_verify: int = 0  # 0: depth + 1 (a chain's full length)

    def __post_init__(self):
        if int(self.depth) != self.depth or self.depth < 1:
            raise ConfigError(f"speculation depth must be a positive integer, got {self.depth}")
        if int(self.top_k) != self.top_k or self.top_k < 1:
            raise ConfigError(f"speculation top_k must be a positive integer, got {self.top_k}")
        if self.num_verify == 0:
            object.__setattr__(self, "num_verify", min(self.depth, self.max_nodes) + 1)
        if self.num_verify < 2:
            raise ConfigError(f"num_verify must be >= 2 (the root and at least one draft), got {self.num_verify}")
        if self.num_verify - 1 > self.max_nodes:
            raise ConfigError(
                f"strategy {self.name}: {self.num_verify - 1} draft nodes requested, but depth {self.depth} with "
                f"top-k {self.top_k} proposes at most {self.max_nodes} (top_k + (depth - 1) * top_k^2)")

    @property
    def max_nodes(self) -> int:
        """Candidate draft nodes an EAGLE-2 expansion produces: K at depth 1, K*K at each deeper level."""
        return self.top_k + (self.depth - 1) * self.top_k * self.top_k

    @property
    def is_chain(self) -> bool:
        return self.top_k == 1

    @property
    def name(self) -> str:
        if self.is_chain and self.num_verify == self.depth + 1:
            return f"chain-{self.depth}"
        return f"{self.depth}_{self.top_k}_{self.num_verify}"

    @staticmethod
    def parse(text: str) -> "SpecStrategy":
        """'chain-4' (depth 4, top-k 1) or 'D_K_V' such as '6_4_16'."""
        s = str(text).strip()
        m = re.fullmatch(r"chain-(\d+)", s)
        if m:
            return SpecStrategy(depth=int(m.group(1)))
        m = re.fullmatch(r"(\d+)_(\d+)_(\d+)", s)
        if m:
            return SpecStrategy(depth=int(m.group(1)), top_k=int(m.group(2)), num_verify=int(m.group(3)))
        raise ConfigError(f"cannot parse speculation strategy {text!r}; use 'chain-D' or 'D_K_V' (e.g. '6_4_16')")


class DraftTree(NamedTuple):
    tokens: jax.Array  # [B, V] int32
    parents: jax.Array  # [B, V] int32
    depth: jax.Array  # [B, V] int32
    rank: Optional[jax.Array] = None  # [B, V] int32 draw order among siblings (the sampled rule)
    draft_logq: Optional[jax.Array] = None  # [B, V, Vocab] the drafter's sampling log-probs at each node
    top_k: int = 1  # static: children per expanded node


def ancestor_mask(parents: jax.Array, max_depth: int) -> jax.Array:
    """[B, V, V] bool: node i sees node j iff j is i or one of its ancestors (follows parents max_depth times)."""
    b, v = parents.shape
    cur = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32)[None], (b, v))
    mask = cur[:, :, None] == jnp.arange(v)[None, None, :]
    for _ in range(max_depth):
        nxt = jnp.take_along_axis(parents, jnp.maximum(cur, 0), axis=1)
        cur = jnp.where(cur >= 0, nxt, cur)
        mask = mask | (cur[:, :, None] == jnp.arange(v)[None, None, :])
    return mask


def chain_tree(root: jax.Array, drafts: jax.Array) -> DraftTree:
    """A chain: root [B] followed by drafts [B, D]."""
    b, d = drafts.shape
    tokens = jnp.concatenate([root[:, None], drafts], axis=1).astype(jnp.int32)
    parents = jnp.broadcast_to(jnp.arange(-1, d, dtype=jnp.int32)[None], (b, d + 1))
    depth = jnp.broadcast_to(jnp.arange(d + 1, dtype=jnp.int32)[None], (b, d + 1))
    return DraftTree(tokens, parents, depth, rank=jnp.zeros((b, d + 1), jnp.int32))


def chain_in_tree(tree: DraftTree, drafts: jax.Array, use: jax.Array) -> DraftTree:
    """``tree`` with the rows ``use`` [B] replaced by the chain ``drafts`` [B, D] (D <= V - 1) in the same V
    slots: nodes 1..D the chain, the other nodes copies of the first draft under the root (a repeated child is
    never reached: the walk takes the first child that matches). Ranks and draft log-probs are kept: the rule
    that reads them is not used for these rows."""
    b, v = tree.tokens.shape
    d = drafts.shape[1]
    if d > v - 1:
        raise ValueError(f"a chain of {d} drafts does not fit a tree of {v} nodes")
    extra = v - 1 - d
    tokens = jnp.concatenate([tree.tokens[:, :1], drafts, jnp.repeat(drafts[:, :1], extra, axis=1)], axis=1)
    parents = jnp.concatenate([jnp.arange(-1, d, dtype=jnp.int32), jnp.zeros((extra,), jnp.int32)])
    depth = jnp.concatenate([jnp.arange(d + 1, dtype=jnp.int32), jnp.ones((extra,), jnp.int32)])
    pick = use[:, None]
    return tree._replace(tokens=jnp.where(pick, tokens.astype(jnp.int32), tree.tokens),
                         parents=jnp.where(pick, parents[None], tree.parents),
                         depth=jnp.where(pick, depth[None], tree.depth))
