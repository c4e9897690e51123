"""The mechanisms' parts that touch private data, with no MPI: clipping a client's update to its
sensitivity (DP-FedAvg, McMahan et al. 2018), the noise's standard deviation, and DP-PCA's release
(Abadi et al. 2016, section 4). The noise itself is noise.py's."""
from __future__ import annotations

import math

import numpy as np


def clip_l2(vector: np.ndarray, S: float) -> tuple[np.ndarray, float]:
    """(vector * min(1, S / ||vector||), ||vector||): a client's update clipped to L2 norm S, so
    that it moves the sum by at most S (DP-FedAvg's sensitivity). The norm sums squares in
    float64: float32 would lose digits over 235,146 terms. Returns a new array, of vector's dtype
    when that is floating (float64 otherwise)."""
    if not S > 0:
        raise ValueError(f"clipping norm S must be > 0, got {S!r}")
    vector = np.asarray(vector)
    flat = vector.astype(np.float64).ravel()
    norm = math.sqrt(float(flat @ flat))
    scale = min(1.0, S / norm) if norm > 0 else 1.0
    dtype = vector.dtype if np.issubdtype(vector.dtype, np.floating) else np.dtype(np.float64)
    return (vector * dtype.type(scale)).astype(dtype, copy=False), norm


def noise_std(z: float, S: float) -> float:
    """The std of the Gaussian noise on a sum of updates clipped to S: z times the sensitivity."""
    if not z >= 0 or not S > 0:
        raise ValueError(f"need z >= 0 and S > 0, got z={z!r}, S={S!r}")
    return z * S


# ------------------------------------------------------------------------------------ DP-PCA
# Abadi et al. 2016, section 4: each training image as a vector scaled to unit L2 norm, their
# Gram matrix A = sum x x^T (one image changes it by x x^T: Frobenius norm 1, and its upper
# triangle, the part released, has L2 norm <= 1), the Gaussian mechanism on the upper triangle
# (mirrored: a symmetric release), then the top K eigenvectors of the noisy matrix. The input
# of the MLP is then the standardised image times those K directions.

def dp_pca(images: np.ndarray, k: int, sigma: float, key: bytes) -> np.ndarray:
    """The (d, k) float32 matrix of the top-k eigenvectors (columns, eigenvalue descending, each
    with its largest entry positive) of sum_i x_i x_i^T + N, x_i = image i / ||image i|| (a zero
    image stays zero) and N symmetric with N(0, sigma^2) upper-triangle entries drawn from the
    CSPRNG stream of `key` (noise.py). images: (n, d) or (n, h, w), any dtype."""
    from ..privacy import noise

    images = np.asarray(images)
    d = int(np.prod(images.shape[1:]))
    if not 1 <= k <= d:
        raise ValueError(f"--dp-pca {k}: must be between 1 and the {d} input values")
    gram = np.zeros((d, d))
    for a in range(0, len(images), 10_000):        # in float64, 10,000 rows at a time
        x = images[a:a + 10_000].reshape(-1, d).astype(np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        gram += x.T @ x
    upper = np.triu_indices(d)
    e = np.zeros((d, d))
    e[upper] = sigma * noise.standard_normal(key, 0, len(upper[0]))
    gram += np.triu(e) + np.triu(e, 1).T
    values, vectors = np.linalg.eigh(gram)
    top = vectors[:, np.argsort(values)[::-1][:k]]
    top *= np.sign(top[np.abs(top).argmax(axis=0), np.arange(k)])      # a fixed sign per column
    return top.astype(np.float32)
