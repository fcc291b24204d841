"""Lossless speculative rollout: a jitted chunk of draft / verify steps.

One step, per row (all static shapes, finished rows frozen by their ``done`` flag):

1. **Draft.** The EAGLE drafter grows a tree of depth D with top-k K (EAGLE-2: expand the K best nodes of
   each level by cumulative draft log-probability, then keep the V - 1 best of all candidates); K = 1 is a
   chain. The model-free proposers (``suffix.py``) draft a chain instead: the n-gram proposer from the row's
   own text, the group proposer from its own, its siblings' and its prompt's earlier answers. The hybrid drafts
   the group proposer's chain for the rows whose suffix match is at least ``hybrid_min`` tokens long, and the
   learned drafter's tree for the others.
2. **Verify.** The target scores the root and the V - 1 nodes in one forward (tree mask over cache + tree).
3. **Accept.** The acceptance rule (``acceptance.py``; target-only for deterministic drafts) commits the
   accepted drafts and a bonus token; a row that meets a stop token, its length limit or a full cache inside
   the run stops exactly there.
4. **Commit.** The accepted path's keys/values are gathered into the next cache slots, and the drafter is
   extended over the committed tokens with the target's hidden states (its cache and last feature).

The state also counts per row the target forwards (``verifies``) and accepted drafts (``accepted``):
acceptance length = committed tokens / target forwards.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.core.errors import ConfigError, InputError
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.decoder import Decoder, decode, padded_causal_mask, prefill, verify, write_kv
from tlt_jax.models.drafter import Drafter, init_drafter_cache
from tlt_jax.models.kv_cache import KVCache, init_cache
from tlt_jax.rollout.acceptance import ChildFn, get_rule
from tlt_jax.rollout.decode import FINISH_RUNNING, RolloutSpec, finish_reason, is_stop_token
from tlt_jax.rollout.suffix import propose_suffix
from tlt_jax.rollout.sampling import (SamplingParams, other_draws, position_uniforms, row_keys, sample_at,
                                     sampling_logprobs)
from tlt_jax.rollout.tree import DraftTree, SpecStrategy, ancestor_mask, chain_tree, chain_in_tree

PROPOSERS = ("eagle", "ngram", "group", "hybrid", "none")
LEARNED = ("eagle", "hybrid")  # proposers that need the learned drafter
MODEL_FREE = ("ngram", "group")  # deterministic chains from the text table, verified target-only


@dataclasses.dataclass(frozen=True)
class SpeculativeSpec:
    """Static settings of speculation (hashable): the strategy, the proposer and the acceptance rule.

    Proposer ``"none"`` drafts nothing: each step is one plain decode step (the strategy is ignored) on the
    same state, so the adaptive engine can switch speculation off and on between chunks for free.

    ``rule`` (``speculative.rule``): ``target_only`` (deterministic drafts, the target alone decides) or
    ``sampled`` (drafts drawn from the drafter's distribution, speculative sampling / recursive rejection
    sampling). The n-gram and group proposers draft deterministically and have no distribution: they use
    ``target_only``. The hybrid applies ``rule`` to the rows the learned drafter drafts and ``target_only`` to
    the rows its suffix match drafts (the choice depends on the committed text only, so each row's step is
    exact under the rule it uses).

    ``ngram_max`` / ``ngram_min``: the n-gram proposer's longest and shortest match; ``suffix_max``: the group
    proposer's longest match (``ngram_min`` its shortest); ``hybrid_min``: the suffix match length from which the
    hybrid drafts from the texts.
    """

    strategy: SpecStrategy = SpecStrategy(depth=4)
    proposer: str = "eagle"
    rule: str = "target_only"
    ngram_max: int = 3
    ngram_min: int = 1
    suffix_max: int = 8
    hybrid_min: int = 4

    def __post_init__(self):
        if self.proposer not in PROPOSERS:
            raise ConfigError(f"unknown draft proposer {self.proposer!r}; choose one of {PROPOSERS}")
        if self.proposer == "none":  # one canonical (hashable) plain spec
            object.__setattr__(self, "strategy", SpecStrategy(depth=1))
            object.__setattr__(self, "rule", "target_only")
        if self.proposer in MODEL_FREE and not self.strategy.is_chain:
            raise ConfigError(f"the {self.proposer} proposer drafts chains only (top_k 1); got strategy "
                              f"{self.strategy.name}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if not self.ngram_min <= self.suffix_max:
            raise ConfigError(f"need ngram_min <= suffix_max, got {self.ngram_min}, {self.suffix_max}")
        if not 1 <= self.hybrid_min <= self.suffix_max:
            raise ConfigError(f"need 1 <= hybrid_min <= suffix_max, got {self.hybrid_min}, {self.suffix_max}")
        rule = get_rule(self.rule)
        if rule.children is not None and self.proposer in MODEL_FREE:
            raise ConfigError(f"the {self.rule!r} rule verifies drafts against the drafter's distribution, and the "
                              f"{self.proposer} proposer drafts deterministically (no distribution): use the "
                              f"'target_only' rule with it")

    @property
    def draft_depth(self) -> int:
        """Draft tokens on the longest path (0 for plain steps)."""
        return 0 if self.proposer == "none" else self.strategy.depth

    @property
    def arm(self) -> str:
        """Short name: 'plain', 'ngram:chain-3', 'group:chain-4', the EAGLE strategy's name ('4_2_8'),
        'hybrid:4_2_8', with '@sampled' for the sampled rule ('4_2_8@sampled')."""
        if self.proposer == "none":
            return "plain"
        name = self.strategy.name if self.proposer == "eagle" else f"{self.proposer}:{self.strategy.name}"
        return name if self.rule == "target_only" else f"{name}@{self.rule}"

    @property
    def learned(self) -> bool:
        """Whether the learned drafter drafts (EAGLE or the hybrid)."""
        return self.proposer in LEARNED

    def with_arm(self, arm: str) -> "SpeculativeSpec":
        """This spec's matching settings with the strategy, proposer and rule of ``arm`` (inverse of
        :attr:`arm`). An arm that names no rule takes this spec's rule if it uses the learned drafter and this
        spec's rule needs one (``4_2_8`` under a ``sampled`` spec is ``4_2_8@sampled``), else ``target_only``."""
        if arm == "plain":
            return SpeculativeSpec(proposer="none")
        body, _, rule = str(arm).partition("@")
        proposer, _, name = body.rpartition(":")
        proposer = proposer or "eagle"
        if not rule:
            rule = self.rule if proposer in LEARNED else "target_only"
        return dataclasses.replace(self, strategy=SpecStrategy.parse(name), proposer=proposer, rule=rule)

    @staticmethod
    def from_arm(arm: str, **settings) -> "SpeculativeSpec":
        """The spec of ``arm`` with default (or the given) matching settings (``ngram_max``, ...)."""
        return SpeculativeSpec(**settings).with_arm(arm)


@flax.struct.dataclass
class SpecState:
    cache: KVCache  # target cache: positions < lengths; the root (next_token) is at position lengths
    dcache: Optional[KVCache]  # drafter cache: pairs (f_t, x_{t+1}) at positions t < lengths (EAGLE only)
    draft_hidden: jax.Array  # [B, H] drafter output at its last position (estimate of the root's feature)
    history: jax.Array  # [T, S + 1] the text table (suffix.py): row i = rollout row i's tokens, then the bank
    history_len: jax.Array  # [T] valid length of each table row (a rollout row's: the root included)
    row: jax.Array  # [B] each rollout row's table row (kept when rows are compacted)
    sources: jax.Array  # [B, C] the table rows a rollout row drafts from (own row first, -1: none)
    next_token: jax.Array  # [B] the root: last committed token
    tokens: jax.Array  # [B, N]
    logprobs: jax.Array  # [B, N]
    num_tokens: jax.Array  # [B]
    done: jax.Array  # [B]
    finish: jax.Array  # [B]
    max_new: jax.Array  # [B]
    accepted: jax.Array  # [B] accepted draft tokens
    verifies: jax.Array  # [B] target forwards while the row was running
    row_keys: jax.Array  # [B, 2] each row's key: the target's draw at answer position t uses u(row, t)
    rng: jax.Array  # the rest of the randomness (the drafter's draws, the sampled rule's acceptance tests)


# ------------------------------------------------------------------------------------------------ drafting


def grow_tree(drafter: Drafter, target: Decoder, head_w: jax.Array, dcache: KVCache, draft_hidden: jax.Array,
              root: jax.Array, strategy: SpecStrategy, children: Optional[ChildFn] = None,
              key: Optional[jax.Array] = None, sampling: Optional[SamplingParams] = None,
              attn_impl: str = "reference") -> DraftTree:
    """A draft tree of V nodes from the drafter's last feature.

    Deterministic (``children`` None): the EAGLE-2 dynamic tree: each level expands the K candidates of best
    cumulative draft log-probability with their top-K children, and the V - 1 best candidates of all levels are
    kept. Sampled (``children``, e.g. ``acceptance.without_replacement``, with ``key`` and the rollout's
    ``sampling``): the children of an expanded node are drawn from the drafter's sampling distribution over the
    whole vocabulary, and which nodes are expanded and kept depends only on their draw ranks (a static shape,
    prior -log(1 + rank) per edge), as the sampled rule's exactness needs; the tree carries each node's rank and
    the drafter's distribution at each node.
    """
    d_max, k, v = strategy.depth, strategy.top_k, strategy.num_verify
    b, h = draft_hidden.shape
    n = dcache.lengths  # the root sits at target position n
    sampled = children is not None
    prior = -jnp.log1p(jnp.arange(k, dtype=jnp.float32))  # [K] static score of a child by its draw rank

    def expand(hidden, level_key):
        """(scores, token ids, ranks, log q) of the children of the nodes whose drafter output is ``hidden``."""
        logits = drafter.logits(hidden, head_w)
        if not sampled:
            logq = jax.nn.log_softmax(logits, axis=-1)
            s_child, i_child = jax.lax.top_k(logq, k)
            return s_child, drafter.to_token_ids(i_child), None, None
        # q is zero off the draft vocabulary, so temperature, top-k and top-p applied over the draft vocabulary
        # give the same distribution as over the whole one, at the draft vocabulary's cost; the children are
        # drawn there and q is scattered over the whole vocabulary once, for the acceptance rule
        # (a draft vocabulary smaller than K: the children beyond q's support come from the whole vocabulary)
        if logits.shape[-1] >= k:
            logq_draft = sampling_logprobs(logits, sampling)
            _, idx = children(level_key, logq_draft, k)
            tok, logq = drafter.to_token_ids(idx), drafter.full_vocab_logits(logq_draft)
        else:
            logq = sampling_logprobs(drafter.full_vocab_logits(logits), sampling)
            _, tok = children(level_key, logq, k)
        rank = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), tok.shape)
        return jnp.broadcast_to(prior, tok.shape), tok, rank, logq

    keys = jax.random.split(key, d_max) if sampled else [None] * d_max
    score, tok, rank, root_logq = expand(draft_hidden, keys[0])  # level 1
    pool_tok, pool_score, pool_parent, pool_depth = [tok], [score], [jnp.full((b, k), -1, jnp.int32)], [1]
    pool_rank, expanded_logq = [rank], [None if root_logq is None else root_logq[:, None]]
    front_pool = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None], (b, k))
    front_tok, front_score = tok, score
    front_feat = jnp.broadcast_to(draft_hidden[:, None, :], (b, k, h))
    n_exp = (d_max - 1) * k  # expanded nodes (levels 1 .. D-1)
    front_anc = jnp.zeros((b, k, max(n_exp, 1)), bool)
    expanded_pool = []  # pool index of each expanded node, by level
    exp_k = exp_v = None
    offset = k
    for level in range(1, d_max):
        slot0 = (level - 1) * k
        own = jnp.arange(max(n_exp, 1))[None, None, :] == (slot0 + jnp.arange(k))[None, :, None]
        front_anc = front_anc | own
        mask = jnp.concatenate([front_anc[:, :, :slot0], jnp.eye(k, dtype=bool)[None].repeat(b, 0)], axis=2)
        positions = jnp.broadcast_to((n + level - 1)[:, None], (b, k)).astype(jnp.int32)
        extra = None if exp_k is None else (exp_k, exp_v)
        hid, (kk, vv), _ = drafter(target, front_tok, front_feat, positions, mask, dcache, extra_kv=extra,
                                   attn_impl=attn_impl)
        exp_k = kk if exp_k is None else jnp.concatenate([exp_k, kk], axis=1)
        exp_v = vv if exp_v is None else jnp.concatenate([exp_v, vv], axis=1)
        s_child, c_tok, c_rank, logq = expand(hid, keys[level])  # [B, K, K]
        expanded_pool.append(front_pool)
        expanded_logq.append(logq)
        cum = (front_score[:, :, None] + s_child).reshape(b, k * k)
        c_tok = c_tok.reshape(b, k * k)
        c_parent = jnp.repeat(front_pool, k, axis=1)  # pool index of each candidate's parent
        pool_tok.append(c_tok)
        pool_score.append(cum)
        pool_parent.append(c_parent)
        pool_depth.append(level + 1)
        pool_rank.append(None if c_rank is None else c_rank.reshape(b, k * k))
        if level < d_max - 1:  # next frontier: the K best candidates of this level
            best_score, best = jax.lax.top_k(cum, k)
            par = best // k  # frontier index of the parent
            front_pool = offset + best.astype(jnp.int32)
            front_tok = jnp.take_along_axis(c_tok, best, axis=1)
            front_score = best_score
            front_feat = jnp.take_along_axis(hid, par[:, :, None], axis=1)
            front_anc = jnp.take_along_axis(front_anc, par[:, :, None], axis=1)
        offset += k * k
    p_tok = jnp.concatenate(pool_tok, axis=1)
    p_score = jnp.concatenate(pool_score, axis=1)
    p_parent = jnp.concatenate(pool_parent, axis=1)
    p_depth = jnp.concatenate([jnp.full((b, t.shape[1]), dd, jnp.int32) for t, dd in zip(pool_tok, pool_depth)],
                              axis=1)
    # The V - 1 best candidates; a child never outranks its parent (scores only fall along a path and ties go
    # to the lower pool index), so the kept set is a tree. Sorting by pool index keeps parents first.
    _, sel = jax.lax.top_k(p_score, v - 1)
    sel = jnp.sort(sel, axis=1).astype(jnp.int32)
    pool_size = p_tok.shape[1]
    rows = jnp.arange(b)[:, None]
    inv = jnp.full((b, pool_size), -2, jnp.int32)
    inv = inv.at[rows, sel].set(jnp.arange(1, v, dtype=jnp.int32)[None])
    sel_parent = jnp.take_along_axis(p_parent, sel, axis=1)
    parent_tree = jnp.where(sel_parent < 0, 0, jnp.take_along_axis(inv, jnp.maximum(sel_parent, 0), axis=1))
    tokens = jnp.concatenate([root[:, None], jnp.take_along_axis(p_tok, sel, axis=1)], axis=1)
    parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), parent_tree], axis=1)
    depth = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.take_along_axis(p_depth, sel, axis=1)], axis=1)
    if not sampled:
        return DraftTree(tokens.astype(jnp.int32), parents, depth, top_k=k)
    # the drafter's distribution at every kept node: the root's, an expanded node's, -inf at leaves
    p_rank = jnp.concatenate(pool_rank, axis=1)
    ranks = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.take_along_axis(p_rank, sel, axis=1)], axis=1)
    all_logq = jnp.concatenate(expanded_logq, axis=1)  # [B, 1 + (D - 1) K, Vocab]
    slot_of_pool = jnp.full((b, pool_size), -1, jnp.int32)
    for level, pool_idx in enumerate(expanded_pool):
        slot_of_pool = slot_of_pool.at[rows, pool_idx].set(1 + level * k + jnp.arange(k, dtype=jnp.int32)[None])
    slots = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.take_along_axis(slot_of_pool, sel, axis=1)], axis=1)
    node_logq = jnp.take_along_axis(all_logq, jnp.maximum(slots, 0)[:, :, None], axis=1)
    node_logq = jnp.where((slots >= 0)[:, :, None], node_logq, -jnp.inf)
    return DraftTree(tokens.astype(jnp.int32), parents, depth, rank=ranks, draft_logq=node_logq, top_k=k)


def _extend_drafter(drafter: Drafter, target: Decoder, dcache: KVCache, feats, tokens, count, active,
                    attn_impl: str = "reference"):
    """Appends pairs (feats[:, j], tokens[:, j]) for j < count at positions lengths + j to the drafter cache.

    Returns (dcache', drafter output at the last appended pair [B, H]).
    """
    b, w = tokens.shape
    j = jnp.arange(w, dtype=jnp.int32)[None, :]
    valid = (j < count[:, None]) & active[:, None]
    pos = dcache.lengths[:, None] + j
    slots = jnp.where(valid, pos, dcache.max_len)
    mask = padded_causal_mask(valid)
    hid, _, dcache = drafter(target, tokens, feats, pos.astype(jnp.int32), mask, dcache,
                             write_slots=slots.astype(jnp.int32), attn_impl=attn_impl)
    last = jnp.maximum(count - 1, 0)
    out = jnp.take_along_axis(hid, last[:, None, None], axis=1)[:, 0]
    dcache = dcache.replace(lengths=dcache.lengths + jnp.where(active, count, 0))
    return dcache, out


# ------------------------------------------------------------------------------------------------ programs


def speculative_start(params, drafter_params, prompt_tokens, prompt_valid, max_new, rng, sources=None, bank=None,
                      bank_len=None, row_ids=None, *, graphdef, drafter_graphdef, spec: RolloutSpec,
                      speculation: SpeculativeSpec, cache_len: int) -> SpecState:
    """Prefill the target (and the drafter over the prompt's (feature, next token) pairs); first token.

    ``sources`` [B, C], ``bank`` [M, cache_len + 1] and ``bank_len`` [M] (``suffix.group_inputs``) lay out the
    text table; without them each row's only source is its own text. ``row_ids`` [B]: each row's index in the
    whole batch, which with ``rng`` makes its key (``sampling.row_keys``; None: 0 .. B - 1), as in plain
    decoding's start.
    """
    model: Decoder = nnx.merge(graphdef, params)
    b, p = prompt_tokens.shape
    cache = init_cache(model.cfg, b, cache_len)
    valid = prompt_valid.astype(bool)
    logits_all, hidden, cache = prefill(model, prompt_tokens, valid, cache, all_logits=False, use_prefix=False,
                                        attn_impl=spec.attn_impl)
    keys = row_keys(rng, b, row_ids)
    rng = other_draws(rng)
    tok, lp = sample_at(keys, jnp.zeros((b,), jnp.int32), logits_all[:, 0], spec.sampling)
    n = cache.lengths
    rank = jnp.cumsum(valid, axis=1) - 1
    rows = jnp.arange(b)
    history = jnp.zeros((b, cache_len + 1), jnp.int32)
    history = history.at[rows[:, None], jnp.where(valid, rank, cache_len + 1)].set(prompt_tokens, mode="drop")
    history = history.at[rows, n].set(tok)
    history_len = (n + 1).astype(jnp.int32)
    if bank is not None:
        history = jnp.concatenate([history, bank.astype(jnp.int32)], axis=0)
        history_len = jnp.concatenate([history_len, bank_len.astype(jnp.int32)])
    if sources is None:
        sources = rows[:, None]
    if drafter_graphdef is not None:
        drafter: Drafter = nnx.merge(drafter_graphdef, drafter_params)
        # Pair at prompt index t: (f_t, next valid token), the sampled token after the last valid one.
        last = jnp.argmax(jnp.where(valid, jnp.arange(p)[None], -1), axis=1)
        nxt = jnp.concatenate([prompt_tokens[:, 1:], prompt_tokens[:, -1:]], axis=1)
        nxt = jnp.where(jnp.arange(p)[None] == last[:, None], tok[:, None], nxt)
        dcache = init_drafter_cache(model.cfg, b, cache_len)
        mask = padded_causal_mask(valid)
        positions = jnp.maximum(rank, 0).astype(jnp.int32)
        slots = jnp.where(valid, positions, cache_len).astype(jnp.int32)
        hid, _, dcache = drafter(model, nxt, hidden, positions, mask, dcache, write_slots=slots, read_cache=False,
                                 attn_impl=spec.attn_impl)
        dcache = dcache.replace(lengths=n)
        draft_hidden = jnp.take_along_axis(hid, last[:, None, None], axis=1)[:, 0]
    else:
        dcache = None
        draft_hidden = jnp.zeros((b, 1), hidden.dtype)
    nmax = spec.max_new_tokens
    tokens = jnp.zeros((b, nmax), jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((b, nmax), jnp.float32).at[:, 0].set(lp.astype(jnp.float32))
    num = jnp.ones((b,), jnp.int32)
    # int32 (not weakly typed from the Python constants): the chunk's output state must match its input state's
    # types exactly, or every program would compile a second time for the state it returns
    reason = finish_reason(is_stop_token(tok, spec), num >= max_new, n >= cache_len)
    zeros = jnp.zeros((b,), jnp.int32)
    return SpecState(cache=cache, dcache=dcache, draft_hidden=draft_hidden, history=history,
                     history_len=history_len, row=rows.astype(jnp.int32), sources=sources.astype(jnp.int32),
                     next_token=tok,
                     tokens=tokens, logprobs=logprobs, num_tokens=num, done=reason != FINISH_RUNNING,
                     finish=reason, max_new=max_new, accepted=zeros, verifies=zeros, row_keys=keys, rng=rng)


def speculative_step(model: Decoder, drafter: Optional[Drafter], head_w, st: SpecState, spec: RolloutSpec,
                     speculation: SpeculativeSpec) -> SpecState:
    strat = speculation.strategy
    d_max = speculation.draft_depth
    b = st.next_token.shape[0]
    rows = jnp.arange(b)
    active = ~st.done
    cache = st.cache
    n = cache.lengths
    s_max = cache.max_len
    # 1. draft
    rng, key = jax.random.split(st.rng)
    rule = get_rule(speculation.rule)
    sampled = rule.children is not None and not spec.sampling.greedy
    if sampled:
        key, draft_key = jax.random.split(key)
    use_text = None  # hybrid: the rows drafted from the texts
    if speculation.learned:
        tree = grow_tree(drafter, model, head_w, st.dcache, st.draft_hidden, st.next_token, strat,
                         *((rule.children, draft_key, spec.sampling) if sampled else ()), attn_impl=spec.attn_impl)
    elif speculation.proposer == "none":
        tree = chain_tree(st.next_token, jnp.zeros((b, 0), jnp.int32))
    if speculation.proposer in ("ngram", "group", "hybrid"):
        own_only = speculation.proposer == "ngram"
        drafts, match = propose_suffix(st.history, st.history_len, st.row,
                                       st.sources[:, :1] if own_only else st.sources, d_max,
                                       speculation.ngram_max if own_only else speculation.suffix_max,
                                       speculation.ngram_min)
        if speculation.proposer == "hybrid":
            use_text = match >= speculation.hybrid_min
            tree = chain_in_tree(tree, drafts, use_text)
        else:
            tree = chain_tree(st.next_token, drafts)
    # 2. verify
    if speculation.proposer == "none":
        # A plain step: the decode forward writes the root's key/value in place (no separate commit), which
        # is cheaper than a one-token verify followed by a scatter; the same numbers either way.
        logits1, hidden1, written = decode(model, st.next_token, cache, active, attn_impl=spec.attn_impl)
        logits, hidden, new_kv = logits1[:, None], hidden1[:, None], None
    else:
        mask = ancestor_mask(tree.parents, d_max)
        positions = (n[:, None] + tree.depth).astype(jnp.int32)
        logits, hidden, new_kv = verify(model, tree.tokens, positions, mask, cache, attn_impl=spec.attn_impl)
    # 3. accept: the target's draw for answer position t uses u(row, t), as plain decoding's does
    draws = position_uniforms(st.row_keys, st.num_tokens[:, None] + jnp.arange(d_max + 1, dtype=jnp.int32)[None])
    acc = rule.accept(key, logits, tree, spec.sampling, d_max, draws=draws)
    if use_text is not None and sampled:  # the texts' deterministic drafts are verified target-only
        by_text = get_rule("target_only").accept(key, logits, tree, spec.sampling, d_max, draws=draws)
        acc = jax.tree.map(lambda t, r: jnp.where(use_text.reshape((b,) + (1,) * (t.ndim - 1)), t, r), by_text, acc)
    w = d_max + 1
    j = jnp.arange(w, dtype=jnp.int32)[None, :]
    emitted = acc.num_accepted + 1
    stop_at = jnp.where(is_stop_token(acc.tokens, spec) & (j < emitted[:, None]), j, w)
    first_stop = jnp.min(stop_at, axis=1)
    count = jnp.minimum(emitted, first_stop + 1)
    count = jnp.minimum(count, st.max_new - st.num_tokens)
    count = jnp.minimum(count, s_max - n)
    count = jnp.where(active, jnp.maximum(count, 0), 0)
    # record the committed tokens
    cols = jnp.where(j < count[:, None], st.num_tokens[:, None] + j, st.tokens.shape[1])
    tokens = st.tokens.at[rows[:, None], cols].set(acc.tokens, mode="drop")
    logprobs = st.logprobs.at[rows[:, None], cols].set(acc.logprobs.astype(st.logprobs.dtype), mode="drop")
    num = st.num_tokens + count
    hist_cols = jnp.where(j < count[:, None], n[:, None] + 1 + j, st.history.shape[1])
    history = st.history.at[st.row[:, None], hist_cols].set(acc.tokens, mode="drop")
    history_len = st.history_len.at[st.row].add(count)
    last_tok = jnp.take_along_axis(acc.tokens, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    new_len = n + count
    reason = finish_reason(is_stop_token(last_tok, spec), num >= st.max_new, new_len >= s_max)
    newly = active & (reason != FINISH_RUNNING)
    # 4. commit: the root and the accepted nodes (count entries) go to slots n .. n + count - 1
    slots = jnp.where(j < count[:, None], n[:, None] + j, s_max).astype(jnp.int32)
    path = acc.path
    if new_kv is None:  # written by the decode forward (active rows commit exactly their root: count = 1)
        cache = written.replace(lengths=new_len)
    else:
        ks, vs = [], []
        for layer, (k_new, v_new) in enumerate(new_kv):
            kp = jnp.take_along_axis(k_new, path[:, :, None, None], axis=1)  # [B, W, KVH, D]
            vp = jnp.take_along_axis(v_new, path[:, :, None, None], axis=1)
            kc, vc = write_kv(cache.k[layer], cache.v[layer], kp, vp, slots)
            ks.append(kc)
            vs.append(vc)
        cache = cache.replace(k=tuple(ks), v=tuple(vs), lengths=new_len)
    dcache, draft_hidden = st.dcache, st.draft_hidden
    if drafter is not None:  # the drafter follows every commit, whichever proposer drafted
        feats = jnp.take_along_axis(hidden, path[:, :, None], axis=1)  # target features of root + accepted
        dcache, out = _extend_drafter(drafter, model, dcache, feats, acc.tokens, count, active & ~newly,
                                      spec.attn_impl)
        draft_hidden = jnp.where((active & ~newly)[:, None], out.astype(draft_hidden.dtype), draft_hidden)
    return st.replace(cache=cache, dcache=dcache, draft_hidden=draft_hidden, history=history,
                      history_len=history_len,
                      next_token=jnp.where(active, last_tok, st.next_token), tokens=tokens, logprobs=logprobs,
                      num_tokens=num, done=st.done | newly, finish=jnp.where(newly, reason, st.finish),
                      accepted=st.accepted + jnp.where(active, jnp.minimum(acc.num_accepted, count), 0),
                      verifies=st.verifies + active.astype(jnp.int32), rng=rng)


def speculative_steps(params, drafter_params, state: SpecState, *, graphdef, drafter_graphdef, spec: RolloutSpec,
                      speculation: SpeculativeSpec) -> SpecState:
    """At most ``spec.chunk_steps`` draft/verify steps; returns early when every row is done."""
    model: Decoder = nnx.merge(graphdef, params)
    drafter = nnx.merge(drafter_graphdef, drafter_params) if drafter_graphdef is not None else None
    head_w = drafter.head_weight(model) if speculation.learned else None  # once per chunk

    def cond(carry):
        i, st = carry
        return (i < spec.chunk_steps) & ~jnp.all(st.done)

    def body(carry):
        i, st = carry
        return i + 1, speculative_step(model, drafter, head_w, st, spec, speculation)

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


START_STATIC = ("graphdef", "drafter_graphdef", "spec", "speculation", "cache_len")
CHUNK_STATIC = ("graphdef", "drafter_graphdef", "spec", "speculation")
start_speculative = jax.jit(speculative_start, static_argnames=START_STATIC)
speculative_chunk = jax.jit(speculative_steps, static_argnames=CHUNK_STATIC, donate_argnames=("state",))


def accept_length(lengths: np.ndarray, verifies: np.ndarray) -> float:
    """Committed tokens per target forward (the first token, from the prefill, not counted)."""
    fwd = int(np.sum(verifies))
    return float((np.sum(lengths) - len(lengths)) / fwd) if fwd else 0.0


def check_drafter(target: ModelConfig, drafter: Optional[ModelConfig], speculation: SpeculativeSpec) -> None:
    """The learned proposer needs a drafter built for this target."""
    if not speculation.learned:
        return
    if drafter is None:
        raise InputError(f"the {speculation.proposer} proposer needs a drafter (train one with "
                         f"`tlt-warmup --config CONFIG`)")
    keys = ("hidden_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
    diff = [f"{k}: target {getattr(target, k)} vs drafter {getattr(drafter, k)}" for k in keys
            if getattr(target, k) != getattr(drafter, k)]
    if diff:
        raise InputError("the drafter was built for another target (" + "; ".join(diff) + ")")
