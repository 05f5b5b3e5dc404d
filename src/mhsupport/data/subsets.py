"""Seeded subsets: which examples a run takes when a budget caps them."""

from __future__ import annotations

import random


def seeded_subset(items: list, size: int | None, seed: int) -> list:
    """A reproducible sample of `size` items (all of them when size is None or too large), in order."""
    if size is None or size >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in keep]
