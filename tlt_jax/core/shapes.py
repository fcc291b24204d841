"""Integer shape arithmetic shared by the layers above (bucket sizes, padded widths, cache lengths)."""

from __future__ import annotations


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``x``."""
    return -(-int(x) // int(multiple)) * int(multiple)


def next_pow2(n: int, floor: int = 1) -> int:
    """The smallest power of two that is >= ``n`` and >= ``floor``."""
    return max(int(floor), 1 << max(0, int(n) - 1).bit_length())


def default_cache_len(prompt_width: int, max_new_tokens: int, multiple: int = 64) -> int:
    """KV cache slots for a prompt width plus the answer budget, rounded up to ``multiple``."""
    return round_up(int(prompt_width) + int(max_new_tokens), multiple)


def answer_widths(cap: int, buckets: int, multiple: int = 8) -> tuple:
    """The few answer widths an update batch is compiled for: ``cap``, ``cap / 2``, ... (``buckets`` of them,
    each rounded up to ``multiple`` and at most ``cap``), ascending. ``buckets = 1``: the cap alone."""
    if int(cap) < 1 or int(buckets) < 1:
        raise ValueError(f"cap and buckets must be >= 1, got {cap} and {buckets}")
    return tuple(sorted({min(int(cap), round_up(max(1, -(-int(cap) // (1 << k))), multiple))
                         for k in range(int(buckets))}))


def answer_width(longest: int, cap: int, buckets: int, multiple: int = 8) -> int:
    """The smallest of :func:`answer_widths` that holds an answer of ``longest`` tokens (answers are cut at the
    cap)."""
    return next(w for w in answer_widths(cap, buckets, multiple) if w >= min(int(longest), int(cap)))
