"""Sharding: which rows a rank reads, and each epoch's order; pure functions of their arguments,
so every rank computes them without communicating."""
from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- sharding

def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's block; the first n % size ranks get one extra row."""
    if size < 1 or not 0 <= rank < size or n < 0:
        raise ValueError(f"shard_range: need n >= 0 and 0 <= rank < size, got {n=} {rank=} {size=}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffle order for one epoch: a pure function of (seed, epoch), so equal on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
