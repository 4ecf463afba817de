"""Bucketing throughput: how many (user, experiment) -> variant decisions one process makes per second.

A benchmark, not a timed test (``python -m abstream.bench.bucketing``): timing assertions flake on shared
CI machines. It measures a naive baseline in the same run, so the ratio means something on any box.
Target: >= 1,000,000 bucketings/s per process on the project's 2-core reference machine.
"""

from __future__ import annotations

import argparse
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable
from hashlib import sha256

from gateway.assignment import BUCKETS, Bucketer, bucket_bounds, coverage_threshold

SEED = "exp_3_landing_journey.p1"
KEY = "exp_3_landing_journey"
WEIGHTS = (0.34, 0.33, 0.33)


def naive_two_hashes(user_id: str, coverage: float, bounds: list[int]) -> int | None:
    """The straightforward version: two fresh SHA-256 (separately salted coverage hash), linear scan."""
    coverage_bucket = int.from_bytes(sha256(f"{SEED}:{KEY}:coverage:{user_id}".encode()).digest()[:8], "big") % BUCKETS
    if coverage_bucket >= round(coverage * BUCKETS):
        return None
    bucket = int.from_bytes(sha256(f"{SEED}:{KEY}:{user_id}".encode()).digest()[:8], "big") % BUCKETS
    for index, bound in enumerate(bounds):
        if bucket < bound:
            return index
    raise AssertionError("bounds end at BUCKETS")


def optimised_two_hashes(users: list[str], coverage: float, bounds: list[int]) -> None:
    """The separately-salted scheme with every trick of Bucketer: shows why one digest is split instead."""
    base = sha256(f"{SEED}:{KEY}:".encode())
    cov = sha256(f"{SEED}:{KEY}:coverage:".encode())
    threshold = coverage_threshold(coverage)
    for user_id in users:
        raw = user_id.encode()
        c = cov.copy()
        c.update(raw)
        if int.from_bytes(c.digest()[:8], "big") % BUCKETS >= threshold:
            continue
        h = base.copy()
        h.update(raw)
        bisect_right(bounds, int.from_bytes(h.digest()[:8], "big") % BUCKETS)


def _rate(fn: Callable[[], object], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abstream.bench.bucketing", description=__doc__)
    parser.add_argument("--users", type=int, default=300_000, help="distinct user ids per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--coverage", type=float, action="append", help="coverage to measure (repeatable)")
    parser.add_argument("--require", type=float, default=0.0, help="exit 1 if Bucketer.variant_index is slower")
    args = parser.parse_args(argv)
    users = [str(uuid.UUID(int=i * 0x9E3779B97F4A7C15 % (1 << 128))) for i in range(args.users)]
    bounds = bucket_bounds(WEIGHTS)
    n = len(users)
    worst = float("inf")
    print(f"{n} users (36-char UUIDs), experiment {KEY} {list(WEIGHTS)}, best of {args.repeat}")
    for coverage in args.coverage or [1.0, 0.5]:
        bucketer = Bucketer(SEED, KEY, coverage, WEIGHTS)
        variant_index = bucketer.variant_index

        def single(variant_index: Callable[[str], int | None] = variant_index) -> None:
            for user_id in users:
                variant_index(user_id)

        def naive(coverage: float = coverage) -> None:
            for user_id in users:
                naive_two_hashes(user_id, coverage, bounds)

        rates = {
            "naive baseline (2 fresh sha256, f-strings, scan)": _rate(naive, n, args.repeat),
            "two salted hashes, optimised": _rate(
                lambda c=coverage: optimised_two_hashes(users, c, bounds), n, args.repeat
            ),
            "Bucketer.variant_index (1 sha256, split digest)": _rate(single, n, args.repeat),
            "Bucketer.variant_indexes (batch)": _rate(lambda b=bucketer: b.variant_indexes(users), n, args.repeat),
        }
        worst = min(worst, rates["Bucketer.variant_index (1 sha256, split digest)"])
        print(f"coverage {coverage}:")
        for name, rate in rates.items():
            print(f"  {name:<52} {rate:>12,.0f} bucketings/s")
    if args.require and worst < args.require:
        print(f"FAIL: {worst:,.0f} < required {args.require:,.0f} bucketings/s")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
