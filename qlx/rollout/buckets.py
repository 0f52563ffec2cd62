"""Shape buckets: round batch sizes and lengths up so that compiled generation functions are reused.

Batch sizes go to powers of two; lengths to ``m · 2^e`` with ``m`` in {4, 5, 6, 7} (four steps per octave, at most
25% padding), so a long prompt does not pay for a doubling of its KV cache.
"""

from __future__ import annotations


def batch_bucket(n: int, multiple_of: int = 1) -> int:
    """The smallest power of two >= n, rounded up to a multiple of ``multiple_of`` (the mesh's batch shards)."""
    if n < 1 or multiple_of < 1:
        raise ValueError(f"batch_bucket needs n >= 1 and multiple_of >= 1 (got n={n}, multiple_of={multiple_of})")
    return round_up(1 << (n - 1).bit_length(), multiple_of)


def length_bucket(n: int, minimum: int = 16) -> int:
    """Smallest ``m · 2^e`` (m in 4..7) that is >= max(n, minimum)."""
    if n < 1 or minimum < 1:
        raise ValueError(f"length_bucket needs n >= 1 and minimum >= 1 (got n={n}, minimum={minimum})")
    target = max(n, minimum)
    if target <= 8:
        return target
    scale = 1
    while 8 * scale < target:
        scale *= 2
    return next(m * scale for m in (4, 5, 6, 7, 8) if m * scale >= target)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple
