"""The alpha-beta scaling model of dp training (pure functions, no I/O).

Allreduce of m bytes over P ranks (reduce-scatter + allgather, Rabenseifner / ring):
    T_ar(P, m) = log2(P) * alpha + 2 (P - 1) / P * m * beta
alpha and beta are fitted to the measured 2-rank OSU curve (where T_ar = alpha + m * beta).
One dp step at P ranks with global batch B: every rank computes ceil(B / P) samples and runs
the (replicated) optimizer, then the gradient is reduced:
    T_step(P) = t_step(ceil(B / P)) * slowdown(P) + T_ar(P, 4 * n_floats)
t_step(b) is the measured single-rank step time at local batch b (it includes the optimizer and
every per-step cost); slowdown(P) = max(1, P / cores) on this machine (P ranks share its cores),
1 on a machine with a core per rank. Strong efficiency = t_step(B) / (P * T_step(P)); weak
efficiency (b per rank, global batch b*P) = t_step(b) / T_step(P).
"""
from __future__ import annotations

import math

import numpy as np


def fit_alpha_beta(sizes_bytes, seconds) -> tuple[float, float]:
    """Least squares on relative error of T = alpha + beta * m; returns (alpha s, beta s/byte)."""
    m = np.asarray(sizes_bytes, float)
    t = np.asarray(seconds, float)
    A = np.stack([np.ones_like(m), m], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    return float(max(alpha, 0.0)), float(max(beta, 0.0))


def allreduce_time(P: int, m_bytes: float, alpha: float, beta: float) -> float:
    if P <= 1:
        return 0.0
    return math.log2(P) * alpha + 2.0 * (P - 1) / P * m_bytes * beta


def ring_bound(P: int, m_bytes: float, bandwidth: float) -> float:
    """The bandwidth term alone: 2 (P-1)/P * m / bandwidth (no latency, no reduction cost)."""
    return 0.0 if P <= 1 else 2.0 * (P - 1) / P * m_bytes / bandwidth


def step_time(b: float, table: list[tuple[int, float]]) -> float:
    """Measured step seconds at local batch b, linear between measured batches (and beyond)."""
    pts = sorted(table)
    xs = [x for x, _ in pts]
    ys = [y for _, y in pts]
    if b <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if b <= x1:
            return y0 + (y1 - y0) * (b - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return y1 + (y1 - y0) * (b - x1) / (x1 - x0)


def predict(kind: str, P: int, batch: int, table, alpha: float, beta: float, m_bytes: float,
            cores: int | None = None) -> dict:
    """kind 'strong' (global batch `batch`) or 'weak' (`batch` per rank)."""
    local = math.ceil(batch / P) if kind == "strong" else batch
    slow = max(1.0, P / cores) if cores else 1.0
    comp = step_time(local, table) * slow
    comm = allreduce_time(P, m_bytes, alpha, beta)
    total = comp + comm
    base = step_time(batch, table)
    eff = base / (P * total) if kind == "strong" else base / total
    return {"kind": kind, "ranks": P, "batch": batch, "local_batch": local, "compute_s": comp,
            "allreduce_s": comm, "step_s": total, "efficiency": eff}
