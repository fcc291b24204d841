"""Target-only lossless acceptance over a draft tree.

Drafts are proposed deterministically (top-k of the drafter), so the target alone decides. Starting at the
root, the walk draws the next token y from the *target's* sampling distribution at the current node
(temperature, top-k, top-p applied; greedy: the argmax). If a child of the current node carries y, the walk
moves to it and continues; otherwise y is the bonus token and the walk stops. After D accepted drafts the walk
draws one more token at the leaf.

This is the sibling-by-sibling rule "accept child c with probability p(c) / (mass left), else remove c and
renormalise; sample the residual when no child is left" written in one draw: that rule accepts each child c
with probability exactly p(c) and samples the residual with p restricted to the other tokens, which is the
same as drawing y ~ p once. Every committed token is therefore drawn from the target's own distribution given
the committed prefix, whatever the drafter proposed: the rollout is exact.

Rules are looked up by name in :data:`ACCEPTANCE_RULES` (the statistical tests register a deliberately wrong
rule next to the exact one to show that they can fail).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp

from tlt_jax.rollout.sampling import SamplingParams, sample
from tlt_jax.rollout.tree import DraftTree


class Acceptance(NamedTuple):
    path: jax.Array  # [B, D + 1] tree indices of the root and the accepted nodes (padded with 0)
    tokens: jax.Array  # [B, D + 1] committed tokens: the accepted drafts, then the bonus token
    logprobs: jax.Array  # [B, D + 1] log-prob of each committed token under the sampling distribution
    num_accepted: jax.Array  # [B] int32 accepted drafts m; m + 1 tokens are committed


def accept_exact(key: jax.Array, logits: jax.Array, tree: DraftTree, sampling: SamplingParams,
                 max_depth: int) -> Acceptance:
    """logits: [B, V, Vocab] target logits at every tree node (the distribution of the node's next token)."""
    b, v, _ = logits.shape
    rows = jnp.arange(b)
    cur = jnp.zeros((b,), jnp.int32)
    going = jnp.ones((b,), bool)
    num = jnp.zeros((b,), jnp.int32)
    path, toks, lps = [cur], [], []
    for j in range(max_depth + 1):
        y, lp = sample(jax.random.fold_in(key, j), logits[rows, cur], sampling)
        toks.append(y)
        lps.append(lp)
        if j == max_depth:
            break
        match = (tree.parents == cur[:, None]) & (tree.tokens == y[:, None])  # [B, V]
        hit = going & match.any(axis=1)
        cur = jnp.where(hit, jnp.argmax(match, axis=1).astype(jnp.int32), cur)
        num = num + hit.astype(jnp.int32)
        going = hit
        path.append(jnp.where(hit, cur, 0))
    # Tokens after the stop point are kept in the arrays but lie beyond num + 1 (callers ignore them); the
    # token at index num is the bonus, drawn at the last accepted node.
    tokens = jnp.stack(toks, axis=1)
    logprobs = jnp.stack(lps, axis=1)
    return Acceptance(jnp.stack(path, axis=1), tokens, logprobs, num)


AcceptRule = Callable[[jax.Array, jax.Array, DraftTree, SamplingParams, int], Acceptance]
ACCEPTANCE_RULES: Dict[str, AcceptRule] = {"exact": accept_exact}


def get_rule(name: str) -> AcceptRule:
    try:
        return ACCEPTANCE_RULES[name]
    except KeyError:
        raise ValueError(f"unknown acceptance rule {name!r}; known: {sorted(ACCEPTANCE_RULES)}") from None
