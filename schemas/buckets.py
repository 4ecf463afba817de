"""Bucket arithmetic: how variant weights become contiguous ranges of an experiment's hash space.

Validation uses it to reject a variant whose weight would get no bucket; the gateway (gateway/assignment.py)
and the stream workers use the same ranges. The specification is docs/assignment.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

BUCKETS = 10_000
"""Every experiment's hash space: variants own contiguous ranges of 0..BUCKETS-1."""


def bucket_counts(weights: Sequence[float]) -> list[int]:
    """Integer bucket counts summing to BUCKETS, proportional to ``weights`` (largest remainder).

    Arithmetic is exact on each weight's shortest decimal form (``repr``: 0.34 is 34/100), so every
    language gets the same counts; leftover buckets go to the largest remainders, ties to the earlier variant.
    """
    exact = [Fraction(repr(float(w))) for w in weights]
    total = sum(exact, Fraction(0))
    if total <= 0 or any(w <= 0 for w in exact):
        raise ValueError("weights must be positive")
    shares = [w * BUCKETS / total for w in exact]
    counts = [int(s) for s in shares]  # floor: shares are positive
    leftover = BUCKETS - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:leftover]:
        counts[i] += 1
    return counts


def bucket_bounds(weights: Sequence[float]) -> list[int]:
    """Exclusive upper bounds of each variant's range: variant i owns [bounds[i-1], bounds[i])."""
    bounds: list[int] = []
    acc = 0
    for count in bucket_counts(weights):
        acc += count
        bounds.append(acc)
    return bounds
