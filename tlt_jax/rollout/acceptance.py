"""Lossless acceptance rules over a draft tree: ``target_only`` and ``sampled``.

A rule says how the drafter's children are chosen at each expanded node and how the target verifies them.

**target_only.** Drafts are proposed deterministically (the drafter's top-k), so the target alone decides.
Starting at the root, the walk draws the next token y from the *target's* sampling distribution at the current
node (temperature, top-k, top-p applied; greedy: the argmax). If a child of the current node carries y, the walk
moves to it and continues; otherwise y is the bonus token and the walk stops. After D accepted drafts the walk
draws one more token at the leaf. This is the sibling-by-sibling rule "accept child c with probability
p(c) / (mass left), else remove c and renormalise; sample the residual when no child is left" written in one
draw: that rule accepts each child c with probability exactly p(c) and samples the residual with p restricted
to the other tokens, which is the same as drawing y ~ p once. A drafted token is accepted with probability
p(token): at T = 1 on a spread distribution that is low even when the drafter knows the distribution well.

**sampled.** The children of a node are drawn from the drafter's own sampling distribution q at that node (the
rollout's temperature, top-k and top-p applied to the drafter's logits as to the target's), without replacement
(Gumbel top-k: the order of the perturbed scores is the order of successive draws), and verified by recursive
rejection sampling (Jeon et al. 2024, "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling
Without Replacement", Algorithm 1): with p_1 = p and q_1 = q, child c_i is accepted with probability
min(1, p_i(c_i) / q_i(c_i)); on a rejection p_{i+1} = norm(max(0, p_i - q_i)) and q_{i+1} = q_i with c_i removed,
renormalised (the distribution the next child was drawn from); with no child left the token is drawn from the
last p_i. A single child (a chain) is the speculative sampling of Leviathan et al. 2023 / Chen et al. 2023:
accept with min(1, p/q), else draw from norm(max(0, p - q)). A drafted token is accepted with probability
1 - TV(p, q). Exactness needs the set of children at a node to be a prefix of the draw order whose length does
not depend on the drawn tokens: with this rule the tree's shape is static (``speculative.grow_tree``). Greedy
decoding (T = 0) uses the target-only walk, token-identical to plain decoding.

Every committed token is drawn from the target's own distribution given the committed prefix, whatever the
drafter proposed: the rollout is exact, and each committed token's log-prob is the target's sampling log-prob.

Rules are looked up by name in :data:`ACCEPTANCE_RULES` (the statistical tests register deliberately wrong
rules next to the exact ones to show that they can fail).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from tlt_jax.core.errors import ConfigError
from tlt_jax.rollout.sampling import SamplingParams, inverse_cdf, sample, sampling_logprobs
from tlt_jax.rollout.tree import DraftTree


class Acceptance(NamedTuple):
    path: jax.Array  # [B, D + 1] tree indices of the root and the accepted nodes (padded with 0)
    tokens: jax.Array  # [B, D + 1] committed tokens: the accepted drafts, then the bonus token
    logprobs: jax.Array  # [B, D + 1] log-prob of each committed token under the sampling distribution
    num_accepted: jax.Array  # [B] int32 accepted drafts m; m + 1 tokens are committed


# (key, logits, tree, sampling, max_depth, draws=None) -> Acceptance; ``draws`` [B, D + 1]: the uniforms of the
# target's draws at walk depths 0..D (the answer positions they commit to), None: from ``key``
AcceptFn = Callable[..., Acceptance]
# (key, log q [..., N], k) -> (ranked scores [..., k], token ids [..., k]): the children of an expanded node
ChildFn = Callable[[jax.Array, jax.Array, int], Tuple[jax.Array, jax.Array]]


class Rule(NamedTuple):
    accept: AcceptFn
    children: Optional[ChildFn] = None  # None: deterministic drafts (the drafter's top-k, EAGLE-2's dynamic tree)


def accept_target_only(key: jax.Array, logits: jax.Array, tree: DraftTree, sampling: SamplingParams,
                       max_depth: int, draws: Optional[jax.Array] = None) -> Acceptance:
    """logits: [B, V, Vocab] target logits at every tree node (the distribution of the node's next token).
    ``draws`` [B, D + 1]: the uniform of the draw at walk depth j (None: drawn from ``key``); with the rollout's
    position uniforms the walk commits the tokens plain decoding draws at those positions."""
    b, v, _ = logits.shape
    rows = jnp.arange(b)
    cur = jnp.zeros((b,), jnp.int32)
    going = jnp.ones((b,), bool)
    num = jnp.zeros((b,), jnp.int32)
    path, toks, lps = [cur], [], []
    for j in range(max_depth + 1):
        u = None if draws is None else draws[:, j]
        y, lp = sample(jax.random.fold_in(key, j), logits[rows, cur], sampling, u)
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


def without_replacement(key: jax.Array, logq: jax.Array, k: int) -> Tuple[jax.Array, jax.Array]:
    """k draws from exp(logq) without replacement, in draw order (Gumbel top-k). Returns (perturbed scores,
    token ids); slots past the support come last, with score -inf."""
    gumbel = jax.random.gumbel(key, logq.shape, jnp.float32).astype(logq.dtype)
    score, idx = jax.lax.top_k(jnp.where(jnp.isfinite(logq), logq + gumbel, -jnp.inf), k)
    return score, idx.astype(jnp.int32)


def _normalised(x: jax.Array, where: jax.Array) -> jax.Array:
    s = jnp.sum(x, axis=-1, keepdims=True)
    return jnp.where(where[:, None] & (s > 0), x / jnp.where(s > 0, s, 1.0), x)


def recursive_rejection(key: jax.Array, p: jax.Array, q: jax.Array, tree: DraftTree, cur: jax.Array,
                        active: jax.Array, *, renormalise_residual: bool = True, ratio_uses_q: bool = True,
                        remove_rejected: bool = True, skip_zero_mass: bool = True):
    """One node of the sampled rule: its children (by rank, the draw order) against target p and draft q
    ([B, Vocab] probabilities). Returns (accepted [B] bool, the accepted child's tree index [B], the residual p
    to draw from when none is accepted [B, Vocab]). A child q gives no mass is no candidate (a draw past the
    support of q). The keyword switches build deliberately wrong variants for the statistical tests."""
    b = p.shape[0]
    rows = jnp.arange(b)
    accepted = jnp.zeros((b,), bool)
    child = cur
    for r in range(tree.top_k):
        slot = (tree.parents == cur[:, None]) & (tree.rank == r)
        idx = jnp.argmax(slot, axis=1).astype(jnp.int32)
        tok = tree.tokens[rows, idx]
        p_t, q_t = p[rows, tok], q[rows, tok]
        exists = active & ~accepted & slot.any(axis=1) & ((q_t > 0) if skip_zero_mass else True)
        u = jax.random.uniform(jax.random.fold_in(key, r), (b,), p.dtype)
        take = exists & (u * q_t < p_t if ratio_uses_q else u < p_t)  # u < min(1, p / q)
        reject = exists & ~take
        residual = jnp.maximum(p - q, 0.0)
        p = jnp.where(reject[:, None], _normalised(residual, reject) if renormalise_residual else residual, p)
        if remove_rejected:
            q = jnp.where(reject[:, None], _normalised(q.at[rows, tok].set(0.0), reject), q)
        child = jnp.where(take, idx, child)
        accepted = accepted | take
    return accepted, child, p


def accept_sampled(key: jax.Array, logits: jax.Array, tree: DraftTree, sampling: SamplingParams,
                   max_depth: int, draws: Optional[jax.Array] = None, reuse_uniforms_after: Optional[int] = None,
                   **variant) -> Acceptance:
    """The sampled rule (module docstring). ``tree.draft_logq`` [B, V, Vocab]: the drafter's sampling log-probs
    at every node (the distribution its children were drawn from); ``tree.rank``: each node's draw order among
    its siblings. ``draws`` [B, D + 1]: the uniforms of the draws from the target's (residual) distribution at
    each walk depth (None: from ``key``); the acceptance tests always use ``key``. ``reuse_uniforms_after`` and
    ``variant`` (``recursive_rejection``'s switches) make the deliberately wrong rules of the statistical tests
    (e.g. depth 1's uniforms reused at every deeper level)."""
    if sampling.greedy or tree.draft_logq is None:
        return accept_target_only(key, logits, tree, sampling, max_depth, draws)
    b = logits.shape[0]
    rows = jnp.arange(b)
    logp = sampling_logprobs(logits, sampling)  # [B, V, Vocab] the target's sampling distribution at each node
    cur = jnp.zeros((b,), jnp.int32)
    going = jnp.ones((b,), bool)
    num = jnp.zeros((b,), jnp.int32)
    path, toks, lps = [cur], [], []
    for j in range(max_depth + 1):
        level = j if reuse_uniforms_after is None else min(j, reuse_uniforms_after)
        k_node, k_draw = jax.random.split(jax.random.fold_in(key, level))
        node_logp = logp[rows, cur]
        p = jnp.exp(node_logp)
        if j < max_depth:
            q = jnp.exp(tree.draft_logq[rows, cur].astype(p.dtype))
            hit, child, p = recursive_rejection(k_node, p, q, tree, cur, going, **variant)
        else:
            hit, child = jnp.zeros((b,), bool), cur
        u = None if draws is None else draws[:, j]
        drawn = inverse_cdf(k_draw, jnp.log(p), u).astype(jnp.int32)  # the residual (or, with no child, p itself)
        y = jnp.where(hit, tree.tokens[rows, child], drawn)
        toks.append(y)
        lps.append(node_logp[rows, y])
        if j == max_depth:
            break
        hit = going & hit
        cur = jnp.where(hit, child, cur)
        num = num + hit.astype(jnp.int32)
        going = hit
        path.append(jnp.where(hit, cur, 0))
    return Acceptance(jnp.stack(path, axis=1), jnp.stack(toks, axis=1), jnp.stack(lps, axis=1), num)


ACCEPTANCE_RULES: Dict[str, Rule] = {
    "target_only": Rule(accept_target_only),
    "sampled": Rule(accept_sampled, without_replacement),
}
RULES = ("target_only", "sampled")  # the exact rules (ACCEPTANCE_RULES may hold test variants too)


def get_rule(name: str) -> Rule:
    try:
        return ACCEPTANCE_RULES[name]
    except KeyError:
        raise ConfigError(f"unknown acceptance rule {name!r}; choose one of {sorted(ACCEPTANCE_RULES)}") from None
