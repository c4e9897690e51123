"""Fixed-point encoding of real vectors as uint32 words that sum mod 2^32 (secure aggregation's
inputs): FixedPoint (one word per value, for noised DP updates) and WideFixedPoint (two limbs per
value: a plain float32 model's updates to well below their own rounding)."""
from __future__ import annotations

import math

import numpy as np


class FixedPoint:
    """Floats <-> uint32 for masking. Each value is clipped to [-bound, bound], scaled by
    `scale` and rounded to the nearest integer q, |q| <= q_max = round(bound * scale); the
    default scale = floor((2^31 - 1) / max_terms) / bound makes max_terms * q_max < 2^31, so
    the sum of up to max_terms contributions stays in (-2^31, 2^31) and the uint32 sum mod 2^32,
    read as int32 (two's complement), is the exact integer sum. Decoding that sum of n_terms
    contributions (each within the bound) errs per coordinate by at most
    n_terms * (1/2 + 2^-20) / scale: half a step per rounding, plus a margin for float64."""

    def __init__(self, bound: float, max_terms: int, scale: float | None = None):
        if not (math.isfinite(bound) and bound > 0) or max_terms < 1:
            raise ValueError(f"fixed point needs bound > 0 and max_terms >= 1, got {bound}, {max_terms}")
        if scale is None:
            if max_terms > 2**31 - 1:
                raise ValueError(f"{max_terms} terms cannot share 31 bits")
            scale = ((2**31 - 1) // max_terms) / bound
        self.bound, self.max_terms, self.scale = float(bound), int(max_terms), float(scale)
        self.q_max = int(np.rint(self.bound * self.scale))
        if self.q_max < 1 or max_terms * self.q_max >= 2**31:
            raise ValueError(f"{max_terms} terms of up to {self.q_max} steps (bound {bound} x scale "
                             f"{scale:g}) can leave (-2^31, 2^31): lower the scale or max_terms")

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if not np.isfinite(x).all():
            raise ValueError("fixed point cannot encode NaN or infinity")
        q = np.rint(np.clip(x, -self.bound, self.bound) * self.scale)
        np.clip(q, -self.q_max, self.q_max, out=q)     # guards float rounding at the bound
        return q.astype(np.int32).view(np.uint32)

    def decode(self, s_u32: np.ndarray, n_terms: int = 1) -> np.ndarray:
        if n_terms > self.max_terms:
            raise ValueError(f"a sum of {n_terms} terms may have overflowed (max_terms={self.max_terms})")
        return np.asarray(s_u32, np.uint32).view(np.int32) / self.scale

    def error_bound(self, n_terms: int = 1) -> float:
        return n_terms * (0.5 + 2.0**-20) / self.scale


class WideFixedPoint:
    """Floats <-> two uint32 limbs per value, for sums that must match float64 arithmetic: about
    2 (31 - log2 max_terms) bits instead of 31 - log2 max_terms (48 bits at 100 terms), so the
    decoded mean equals the plain float64 one to far below a float32 ulp, and FedAvg in the clear
    and under secure aggregation give the same float32 model. A value is clipped to the bound,
    scaled and rounded to q, |q| <= q_max, and offset to u = q + q_max in [0, 2^(2k)); its limbs
    u mod 2^k and u >> k each sum over max_terms terms without reaching 2^31, so the uint32 sums
    mod 2^32 are exact. encode gives [low limbs | high limbs] (2n words); decode needs the exact
    number of terms summed (each brought one offset)."""

    def __init__(self, bound: float, max_terms: int):
        if not (math.isfinite(bound) and bound > 0) or max_terms < 1:
            raise ValueError(f"fixed point needs bound > 0 and max_terms >= 1, got {bound}, {max_terms}")
        self.k = 31 - math.ceil(math.log2(max_terms)) if max_terms > 1 else 30
        if self.k < 8:
            raise ValueError(f"{max_terms} terms leave too few bits per limb")
        self.bound, self.max_terms = float(bound), int(max_terms)
        self.q_max = 2 ** (2 * self.k - 1) - 1
        self.scale = self.q_max / self.bound

    def encode(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[low limbs | high limbs] of x, into `out` (2n uint32 words) when given."""
        x = np.asarray(x, np.float64)
        if not np.isfinite(x).all():
            raise ValueError("fixed point cannot encode NaN or infinity")
        q = np.clip(x, -self.bound, self.bound)
        q *= self.scale
        np.rint(q, out=q)
        np.clip(q, -self.q_max, self.q_max, out=q)
        u = q.astype(np.int64)
        u += self.q_max
        np.clip(u, 0, 2 * self.q_max, out=u)           # float64 cannot hold q_max itself exactly
        n = len(u)
        out = np.empty(2 * n, np.uint32) if out is None else out
        np.bitwise_and(u, (1 << self.k) - 1, out=out[:n], casting="unsafe")
        np.right_shift(u, self.k, out=u)
        out[n:] = u
        return out

    def decode(self, s_u32: np.ndarray, n_terms: int) -> np.ndarray:
        if not 0 <= n_terms <= self.max_terms:
            raise ValueError(f"a sum of {n_terms} terms may have overflowed (max_terms={self.max_terms})")
        s = np.asarray(s_u32, np.uint32).astype(np.int64)
        n = len(s) // 2
        total = (s[n:] << self.k) + s[:n] - n_terms * self.q_max
        return total / self.scale

    def error_bound(self, n_terms: int = 1) -> float:
        # half a step per rounding, plus float64's own rounding of x * scale (q_max < 2^62)
        return n_terms * (0.5 + self.q_max * 2.0**-52) / self.scale
