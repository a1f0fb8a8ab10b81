"""The one sub-sampling rule: the first part of a seeded permutation.

Corpora (documents), labelled sets (rows) and train/test splits all use it, so for one seed a
smaller fraction is always a subset of a larger one.
"""

import random
from typing import List, Optional

from ..errors import UsageError


def check_fraction(fraction: Optional[float], what: str = "fraction") -> None:
    """UsageError unless ``fraction`` is None or in (0, 1]."""
    if fraction is None:
        return
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise UsageError(f"{what} must be in (0, 1], got {fraction}")


def check_max_samples(max_samples: Optional[int]) -> None:
    """UsageError unless ``max_samples`` is None or a positive count."""
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise UsageError(f"max-samples must be at least 1, got {max_samples}")


def seeded_order(n: int, seed: int = 0) -> List[int]:
    """A seeded permutation of range(n) (Python's Mersenne Twister: stable across versions)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def seeded_prefix(n: int, fraction: Optional[float] = None, seed: int = 0, minimum: int = 1,
                  cap: Optional[int] = None) -> List[int]:
    """Indices of a seeded sub-sample of ``n`` items.

    Nested: for one seed, a smaller fraction is a prefix of a larger one.

    Args:
        n: the number of items.
        fraction: keep the first round(fraction·m) of a seeded permutation, where m = min(n, cap);
            None keeps all m, in permutation order.
        seed: seeds the permutation.
        minimum: keep at least this many.
        cap: consider at most this many items (None: all n).

    Returns:
        The kept indices, in permutation order.

    Raises:
        UsageError: ``fraction`` is not in (0, 1].
    """
    check_fraction(fraction)
    order = seeded_order(n, seed)
    if cap is not None:
        order = order[:cap]
    if fraction is None:
        return order
    return order[: max(minimum, round(float(fraction) * len(order)))]
