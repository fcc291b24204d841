"""The online drafter's data: target features from the actor's log-prob forward, tagged with their RL step.

Each RL step the trainer runs the policy over (prompt + answer) to get the old log-probs; the final-norm hidden
states of that forward are exactly the features the EAGLE drafter learns to predict. :meth:`DrafterBuffer.add`
keeps, per answer, the last ``window`` tokens from the last prompt token on (so the first answer token is a
prediction target) with their features, on the host. :meth:`DrafterBuffer.sample` draws sequences of the
previous ``max_step_lag`` steps -- never of the current one: the drafter trains during step s's rollout on data
of steps < s (the one-step offset) -- and packs them first-fit into fixed-shape rows with segment ids, the
layout :func:`tlt_jax.drafter.loss.drafter_loss` takes with ``segments``.

The buffer is bounded: ``capacity`` sequences, the oldest steps' evicted first.
"""

from __future__ import annotations

import threading
from typing import List, NamedTuple, Optional

import numpy as np

from tlt_jax.core.errors import ConfigError, InputError


class PackedBatch(NamedTuple):
    """Sequences packed into ``R`` rows of ``L`` tokens (right padded)."""

    tokens: np.ndarray     # [R, L] int32, 0 in the padding
    feats: np.ndarray      # [R, L, H] target features (the stored dtype), 0 in the padding
    loss_mask: np.ndarray  # [R, L] bool: answer positions to predict
    segments: np.ndarray   # [R, L] int32: k > 0 for the k-th sequence of the row, 0 = padding
    steps: np.ndarray      # [S] int64: RL step of each packed sequence, in (row, segment) order


class _Seq(NamedTuple):
    step: int
    order: int              # insertion counter (evicts the older rows of a step first)
    tokens: np.ndarray      # [n] int32
    feats: np.ndarray       # [n, H]
    loss_mask: np.ndarray   # [n] bool


class DrafterBuffer:
    """Features from the actor's log-prob forward, tagged with their RL step (bounded).

    Args:
      capacity: the most sequences held; beyond it the oldest steps' sequences are dropped first.
      window: the most tokens kept per sequence (the last ones of the answer, plus the last prompt token when
        the answer fits).
      max_step_lag: :meth:`sample` at step s draws from steps s - max_step_lag .. s - 1.

    Thread safe: ``add`` and ``sample`` may be called from different threads.
    """

    def __init__(self, capacity: int = 256, window: int = 512, max_step_lag: int = 2):
        if int(capacity) < 1:
            raise ConfigError(f"drafter buffer capacity must be >= 1 sequence, got {capacity}")
        if int(window) < 2:
            raise ConfigError(f"drafter buffer window must be >= 2 tokens (one prediction needs two), got {window}")
        if int(max_step_lag) < 1:
            raise ConfigError(f"drafter buffer max_step_lag must be >= 1 (data of the current step is never "
                              f"sampled), got {max_step_lag}")
        self.capacity = int(capacity)
        self.window = int(window)
        self.max_step_lag = int(max_step_lag)
        self._seqs: List[_Seq] = []
        self._order = 0
        self._hidden: Optional[int] = None
        self._dtype = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ adding

    def add(self, step: int, tokens, feats, valid, answer_start: int) -> int:
        """Stores the answers of one RL batch; returns the number of sequences added.

        Args:
          step: the RL step the batch belongs to.
          tokens: [B, T] int token ids; feats: [B, T, H] the target's final hidden states of those tokens;
          valid: [B, T] bool real tokens. The trainer's layout: a left-padded prompt ending at ``answer_start``,
            then the answer (the valid positions >= ``answer_start``) and trailing padding.
          answer_start: first answer slot (the padded prompt length).
        Rows with fewer than 2 answer tokens are skipped. The arrays may live on a device; the rows kept are
        copied to the host. When the buffer then holds more than ``capacity`` sequences, those of the oldest
        steps are dropped (so a batch larger than the capacity keeps only its last ``capacity`` rows).
        """
        tokens = np.asarray(tokens)
        valid = np.asarray(valid)
        if tokens.ndim != 2:
            raise InputError(f"tokens must be [B, T], got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        b, t = tokens.shape
        if valid.shape != (b, t):
            raise InputError(f"valid must be [B, T] = {(b, t)} like tokens, got shape {valid.shape}")
        if np.ndim(feats) != 3 or tuple(np.shape(feats)[:2]) != (b, t):
            raise InputError(f"feats must be [B, T, H] with [B, T] = {(b, t)} like tokens, got shape "
                             f"{tuple(np.shape(feats))}")
        h = int(np.shape(feats)[2])
        if not 0 <= int(answer_start) <= t:
            raise InputError(f"answer_start must be in [0, T = {t}], got {answer_start}")
        answer_start = int(answer_start)
        valid = valid.astype(bool)
        with self._lock:
            if self._seqs and h != self._hidden:
                raise InputError(f"feats have hidden size {h} but the buffer holds features of size {self._hidden}")
        feats = np.asarray(feats)  # one device-to-host copy of the batch; rows are sliced (copied) below

        new: List[_Seq] = []
        for i in range(b):
            pos = np.flatnonzero(valid[i])
            ans = pos[pos >= answer_start]
            if ans.size < 2:
                continue
            prompt = pos[pos < answer_start]
            keep = np.concatenate([prompt[-1:], ans])[-self.window:]
            new.append(_Seq(int(step), 0, tokens[i, keep].astype(np.int32), feats[i, keep],
                            keep >= answer_start))
        with self._lock:
            if not self._seqs:
                self._hidden, self._dtype = h, feats.dtype
            for s in new:
                f = s.feats if s.feats.dtype == self._dtype else s.feats.astype(self._dtype)
                self._seqs.append(s._replace(order=self._order, feats=f))
                self._order += 1
            if len(self._seqs) > self.capacity:
                self._seqs.sort(key=lambda s: (s.step, s.order))
                del self._seqs[:len(self._seqs) - self.capacity]
        return len(new)

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, rng: np.random.Generator, current_step: int, rows: int, seq_len: int
               ) -> Optional[PackedBatch]:
        """A packed batch of ``rows`` x ``seq_len`` from the steps before ``current_step``; None if none held.

        Eligible: sequences of steps ``current_step - max_step_lag <= step < current_step``. They are drawn in
        random order and placed first-fit (the first row with room); each eligible sequence is drawn once before
        any is drawn again, and drawing goes on while one still fits somewhere. A sequence longer than
        ``seq_len`` keeps its last ``seq_len`` tokens.
        """
        if int(rows) < 1:
            raise ConfigError(f"rows must be >= 1, got {rows}")
        if int(seq_len) < 2:
            raise ConfigError(f"seq_len must be >= 2 tokens (one prediction needs two), got {seq_len}")
        rows, seq_len, current_step = int(rows), int(seq_len), int(current_step)
        lo = current_step - self.max_step_lag
        with self._lock:
            pool = [s for s in self._seqs if lo <= s.step < current_step]
            dtype, h = self._dtype, self._hidden
        if not pool:
            return None
        lengths = np.array([min(len(s.tokens), seq_len) for s in pool])
        shortest = int(lengths.min())
        tokens = np.zeros((rows, seq_len), np.int32)
        feats = np.zeros((rows, seq_len, h), dtype)
        loss_mask = np.zeros((rows, seq_len), bool)
        segments = np.zeros((rows, seq_len), np.int32)
        fill = np.zeros(rows, np.int64)   # tokens used per row
        count = np.zeros(rows, np.int64)  # sequences per row
        placed: List[tuple] = []          # (row, segment, step)
        while seq_len - fill.min() >= shortest:
            progress = False
            for j in rng.permutation(len(pool)):
                n = int(lengths[j])
                fits = np.flatnonzero(seq_len - fill >= n)
                if fits.size == 0:
                    continue
                r = int(fits[0])
                s = pool[j]
                a, e = int(fill[r]), int(fill[r]) + n
                tokens[r, a:e] = s.tokens[-n:]
                feats[r, a:e] = s.feats[-n:]
                loss_mask[r, a:e] = s.loss_mask[-n:]
                count[r] += 1
                segments[r, a:e] = count[r]
                fill[r] = e
                placed.append((r, int(count[r]), s.step))
                progress = True
                if seq_len - fill.min() < shortest:
                    break
            if not progress:
                break
        placed.sort()
        steps = np.array([p[2] for p in placed], np.int64)
        return PackedBatch(tokens, feats, loss_mask, segments, steps)

    # ------------------------------------------------------------------------------------------ introspection

    def __len__(self) -> int:
        with self._lock:
            return len(self._seqs)

    def steps(self) -> List[int]:
        """The RL steps with sequences held, ascending."""
        with self._lock:
            return sorted({s.step for s in self._seqs})

    @property
    def nbytes(self) -> int:
        """Host bytes of the held sequences (tokens, features, masks)."""
        with self._lock:
            return int(sum(s.tokens.nbytes + s.feats.nbytes + s.loss_mask.nbytes for s in self._seqs))
