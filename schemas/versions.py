"""App versions as targeting compares them: PEP 440 when both sides parse, else a numeric-prefix fallback.

Targeting needs this twice: when a manifest or an API request is validated (``min_app_version`` must be a
version, and not above ``max_app_version``) and when the gateway decides whether a user may enter.
"""

from __future__ import annotations

import re
from functools import lru_cache

from packaging.version import InvalidVersion, Version


class InvalidVersionString(ValueError):
    """Neither PEP 440 nor the numeric-prefix fallback can read the string."""


_FALLBACK_RE = re.compile(r"^\s*[vV]?(\d+(?:\.\d+)*)(.*)$", re.DOTALL)
_SUFFIX_TOKEN_RE = re.compile(r"\d+|[A-Za-z]+")


@lru_cache(maxsize=4096)
def _pep440(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


@lru_cache(maxsize=4096)
def _fallback_key(text: str) -> tuple[tuple[int, ...], int, tuple[tuple[int, int | str], ...]]:
    """Semver-like key for strings PEP 440 rejects (``1.2.3 (45)``, ``2024.01.05-hotfix``).

    Numeric release first (trailing zeros ignored); anything after it, up to a ``+build`` part, is a
    pre-release tag, so ``1.2.3-hotfix`` < ``1.2.3``; tags compare token by token, numbers below words.
    """
    match = _FALLBACK_RE.match(text)
    if match is None:
        raise InvalidVersionString(f"not a version: {text!r}")
    release = tuple(int(part) for part in match.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    suffix = match.group(2).split("+", 1)[0]
    tokens = tuple((0, int(t)) if t.isdigit() else (1, t.lower()) for t in _SUFFIX_TOKEN_RE.findall(suffix))
    return release, (0 if tokens else 1), tokens


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1. PEP 440 when both parse (``0.10.0`` > ``0.9.1``, ``1.2.3-beta`` < ``1.2.3``), else the
    numeric-prefix fallback for both. Raises InvalidVersionString if either has no leading number."""
    va, vb = _pep440(a), _pep440(b)
    if va is not None and vb is not None:
        return (va > vb) - (va < vb)
    ka, kb = _fallback_key(a), _fallback_key(b)
    return (ka > kb) - (ka < kb)


def is_valid_version(text: str) -> bool:
    """True when ``compare_versions`` can use the string."""
    if _pep440(text) is not None:
        return True
    try:
        _fallback_key(text)
    except InvalidVersionString:
        return False
    return True
