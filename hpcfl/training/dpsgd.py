"""DP-SGD's parts on the training side (Abadi et al. 2016): the Gaussian noise added once to the
summed gradient of every step, and DP-PCA's projection of the training data. The mechanisms'
math is privacy/'s; this module ties it to the flat buffer and the ranks."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.shard import shard_range

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..data.cache import Dataset
    from ..parallel.comm import Comm
    from ..privacy.plan import DpPlan

NOISE_BLOCK = 1 << 16        # coordinates per noise generator: the unit each rank draws
# The kernels read a row as (x / 255 - mean) / std; rows already standardised and projected by
# DP-PCA go through unchanged with mean 0 and std 1/255.
PROJECTED_NORM = (0.0, 1.0 / 255.0)


class GaussianNoise:
    """DP-SGD's noise as a pre_reduce hook: N(0, (z C)^2) added exactly once to every coordinate
    of the summed gradient. The flat buffer is cut into blocks of 65,536 coordinates; each rank
    adds the blocks shard_range gives it, each the CSPRNG stream (step, block) under the run's
    DP-SGD key (noise.py: AES-256-CTR keyed from the 256-bit secret seed), so the noise is the
    same for any number of ranks (P ranks give one process's model), its cost is split across
    them, and a resumed run draws it again bitwise. The trainer sets `step` before each step."""

    def __init__(self, plan: DpPlan, n: int, rank: int, size: int, backend: Backend):
        from ..privacy import noise

        blocks = math.ceil(n / NOISE_BLOCK)
        lo, hi = shard_range(blocks, rank, size)
        self.ranges = [(b, b * NOISE_BLOCK, min(n, (b + 1) * NOISE_BLOCK)) for b in range(lo, hi)]
        self.plan, self.backend = plan, backend
        self.buf = np.empty(NOISE_BLOCK, np.float32)
        self.step = 0
        self.gaussian = noise.Gaussian()
        self._keyed: tuple[Any, bytes] = (None, b"")

    def _key(self) -> bytes:
        from ..privacy import noise

        # read now: a resumed run takes the checkpoint's seed, and keys its own attempt
        which = (self.plan.noise_seed, self.plan.noise_ids)
        if self._keyed[0] != which:
            self._keyed = (which, noise.derive_key(self.plan.noise_seed, "dpsgd", *self.plan.noise_ids))
        return self._keyed[1]

    def __call__(self, gradbuf: Any) -> None:
        key = self._key()
        std = np.float32(self.plan.z * self.plan.clip)    # z may be recalibrated on resume
        for b, a, e in self.ranges:
            noise = self.gaussian.standard_normal(key, self.step * NOISE_BLOCK + b, self.buf[:e - a])
            noise *= std
            gradbuf[a:e] += self.backend.to_device(noise)


def project(comm: Comm, backend: Backend, data: Dataset, plan: DpPlan) -> tuple[Dataset, np.ndarray]:
    """DP-PCA (mechanisms.dp_pca) on rank 0 from the raw training images, keyed by the run's
    noise seed; every rank gets the (D, K) projection and the data set whose rows are the
    standardised images times it (train with PROJECTED_NORM)."""
    from ..core.model import input_rows
    from ..privacy import mechanisms, noise

    def pca():
        key = noise.derive_key(plan.noise_seed, "dp-pca")
        return mechanisms.dp_pca(backend.to_host(data.train_x), plan.pca, plan.pca_noise, key)

    projection = comm.bcast(pca() if comm.rank == 0 else None)

    def rows(x):
        x = backend.to_host(x)
        out = np.empty((len(x), projection.shape[1]), np.float32)
        for a in range(0, len(x), 10_000):     # as the saved model will compute them
            out[a:a + 10_000] = input_rows(x[a:a + 10_000], data.mean, data.std, projection)
        return backend.upload_images(out)

    return dataclasses.replace(data, train_x=rows(data.train_x), test_x=rows(data.test_x)), projection
