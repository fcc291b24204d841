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
