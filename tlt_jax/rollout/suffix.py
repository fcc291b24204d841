"""Model-free proposers: continue the longest earlier match of a row's last tokens in a set of texts.

The rollout state keeps a *text table* (``SpecState.history``, [T, S + 1] tokens by position): one row per
rollout row (its prompt and answer so far, the root included) followed by the answers of earlier rollouts of
the same prompts, each after its prompt (the bank, from a :class:`GroupStore`). Each rollout row has its own
table row (``row``) and its *sources* (``sources`` [B, C]): its own table row first, then its siblings' (the
rows of the batch with the same prompt: a GRPO group) and its prompt's stored answers. The table is indexed by
original row, so rows that finished and were compacted away keep serving their siblings.

:func:`propose_suffix` looks, in every source, for the longest run of tokens that equals the row's last
tokens (at most ``max_n``, at least ``min_n``), and drafts the ``depth`` tokens that followed it. Ties go to
the earlier source (the row's own text first) and then to the most recent occurrence. In the row's own text
only earlier occurrences count (the match must end before the root). The **n-gram** proposer is this search
over the row's own text alone (``sources[:, :1]``, ``max_n`` = ``speculative.ngram_max``); the **group**
proposer searches every source (``max_n`` = ``speculative.suffix_max``). Drafts are deterministic: both verify
with the target-only rule. Without a match the root token is proposed, repeated (any proposal is safe: the
target decides). The search is a vectorised comparison of shifted copies: ``max_n`` passes over [B, C, S].
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tlt_jax.core.errors import ConfigError


def propose_suffix(table: jax.Array, table_len: jax.Array, row: jax.Array, sources: jax.Array, depth: int,
                   max_n: int, min_n: int = 1) -> Tuple[jax.Array, jax.Array]:
    """(drafts [B, depth] int32, match length [B] int32, 0 where nothing matched).

    Args:
      table: [T, S] int32 texts by position; ``table_len`` [T] their valid lengths.
      row: [B] the table row of each rollout row (its last valid token, at ``table_len[row] - 1``, is the root).
      sources: [B, C] table rows to search (-1: none); a source equal to ``row`` is the row's own text.
    """
    b, c = sources.shape
    s = table.shape[1]
    last = table_len[row] - 1  # [B] the root's position
    own_text = table[row]  # [B, S]
    key_pos = last[:, None] - jnp.arange(max_n, dtype=jnp.int32)[None]  # key[j] = the j-th token back from the root
    key = jnp.take_along_axis(own_text, jnp.maximum(key_pos, 0), axis=1)
    key_ok = key_pos >= 0
    src_row = jnp.maximum(sources, 0)
    src = table[src_row]  # [B, C, S]
    is_own = sources == row[:, None]
    src_len = jnp.where(sources >= 0, table_len[src_row], 0)
    # a match may end at i when a continuation token exists: i < last in the row's own text (an earlier
    # occurrence), i < len - 1 in another text
    end_limit = jnp.where(is_own, last[:, None], src_len - 1)  # [B, C]
    pos = jnp.arange(s, dtype=jnp.int32)
    run = pos[None, None, :] < end_limit[:, :, None]
    match = jnp.zeros((b, c, s), jnp.int32)
    for j in range(max_n):
        shifted = jnp.roll(src, j, axis=2)  # shifted[..., i] = src[..., i - j]
        run = run & (shifted == key[:, j, None, None]) & (pos >= j)[None, None] & key_ok[:, j, None, None]
        match = match + run.astype(jnp.int32)
    # the longest match; then the earliest source; then the latest position
    score = match * (c * s) + (c - 1 - jnp.arange(c, dtype=jnp.int32))[None, :, None] * s + pos[None, None]
    score = jnp.where(match >= min_n, score, -1).reshape(b, c * s)
    best = jnp.argmax(score, axis=1)
    found = jnp.max(score, axis=1) >= 0
    best_src, best_end = best // s, best % s
    length = jnp.where(found, match.reshape(b, c * s)[jnp.arange(b), best], 0).astype(jnp.int32)
    text = src[jnp.arange(b), best_src]  # [B, S]
    idx = best_end[:, None] + 1 + jnp.arange(depth, dtype=jnp.int32)[None]
    cont = jnp.take_along_axis(text, jnp.clip(idx, 0, s - 1), axis=1)
    # continuation tokens must exist: up to the root in the row's own text, up to the end of another text
    cont_end = jnp.where(is_own[jnp.arange(b), best_src], last + 1, src_len[jnp.arange(b), best_src])
    root = jnp.take_along_axis(own_text, jnp.maximum(last, 0)[:, None], axis=1)
    ok = found[:, None] & (idx < cont_end[:, None])
    return jnp.where(ok, cont, root).astype(jnp.int32), length


def propose_ngram(history: jax.Array, length: jax.Array, depth: int, max_n: int = 3, min_n: int = 1) -> jax.Array:
    """The n-gram proposer on a table whose rows are the rollout rows themselves: drafts [B, depth].

    ``history`` [B, S] tokens by position, ``length`` [B] valid lengths (the root at ``length - 1``).
    """
    own = jnp.arange(history.shape[0], dtype=jnp.int32)
    drafts, _ = propose_suffix(history, length, own, own[:, None], depth, max_n, min_n)
    return drafts


# ------------------------------------------------------------------------------------------------ host side


class GroupStore:
    """Answers of earlier rollouts, keyed by prompt: at most ``per_prompt`` (the most recent) for each of at most
    ``max_prompts`` prompts (the least recently used prompt is forgotten first)."""

    def __init__(self, per_prompt: int, max_prompts: int = 4096):
        if per_prompt < 1 or max_prompts < 1:
            raise ConfigError(f"a group store keeps at least one answer of one prompt, got per_prompt={per_prompt}, "
                              f"max_prompts={max_prompts}")
        self.per_prompt, self.max_prompts = int(per_prompt), int(max_prompts)
        self._answers: "collections.OrderedDict[Tuple[int, ...], collections.deque]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def answers(self, prompt: Sequence[int]) -> List[List[int]]:
        """The stored answers of ``prompt``, most recent first."""
        got = self._answers.get(tuple(int(t) for t in prompt))
        return [] if got is None else list(reversed(got))

    def record(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> None:
        for prompt, answer in zip(prompts, answers):
            k = tuple(int(t) for t in prompt)
            dq = self._answers.pop(k, None) or collections.deque(maxlen=self.per_prompt)
            dq.append([int(t) for t in answer])
            self._answers[k] = dq
            while len(self._answers) > self.max_prompts:
                self._answers.popitem(last=False)


def group_inputs(prompts: Sequence[Sequence[int]], cache_len: int, num_sources: int,
                 store: Optional[GroupStore] = None) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(sources [B, C], bank [M, cache_len + 1], bank lengths [M]) of a rollout batch, for the start program.

    Rows with the same prompt are a group. Row i's sources: i, its siblings, then its prompt's stored answers
    (table rows B + m, each after its prompt, as a row's own text is), at most ``num_sources`` (C) in all. With
    a store, the bank has one slot per batch row (M = B): a group of g rows draws on at most g stored answers (the
    most recent); without one M = 0 and the bank is None.
    """
    b = len(prompts)
    if num_sources < 1:
        raise ConfigError(f"a row searches at least its own text: num_sources must be >= 1, got {num_sources}")
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(int(t) for t in p), []).append(i)
    bank = np.zeros((b, cache_len + 1), np.int32) if store is not None else None
    bank_len = np.zeros((b,), np.int32) if store is not None else None
    stored: Dict[Tuple[int, ...], List[int]] = {}
    slot = 0
    if store is not None:
        for prompt, members in groups.items():
            stored[prompt] = []
            for ans in store.answers(prompt)[:len(members)]:
                text = (list(prompt) + ans)[:cache_len + 1]  # with its prompt: matches run across the boundary
                bank[slot, :len(text)] = text
                bank_len[slot] = len(text)
                stored[prompt].append(b + slot)
                slot += 1
    sources = np.full((b, num_sources), -1, np.int32)
    for prompt, members in groups.items():
        head = members[:num_sources]  # a row's siblings come first, in order: the first C - 1 besides itself
        extra = stored.get(prompt, [])
        for i in members:
            mine = ([i] + [j for j in head if j != i][:num_sources - 1] + extra)[:num_sources]
            sources[i, :len(mine)] = mine
    return sources, bank, bank_len
