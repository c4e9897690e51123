"""Simulated attacks for robustness experiments, with no MPI.

A seeded set of clients is malicious for the whole run (malicious_clients). Each round a
malicious client either sends a poisoned update in place of its honest delta (poison_update),
or trains honestly on flipped labels (flip_labels, a data attack):

  signflip  -scale * delta                 (reverses and amplifies the honest direction)
  scale     scale * delta                  (model replacement, Bagdasaryan et al. 2020)
  gaussian  random noise of ||delta||_2    (an uninformative update of plausible size)
  nan       all NaN                        (a crashed or corrupt client; validation rejects it)
  labelflip train on y -> num_classes - 1 - y
"""
from __future__ import annotations

import numpy as np

UPDATE_KINDS = ("signflip", "scale", "gaussian", "nan")      # poison_update's kinds
DATA_KINDS = ("labelflip",)                                  # flip_labels
KINDS = UPDATE_KINDS + DATA_KINDS


def malicious_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """round(fraction * num_clients) distinct client ids in increasing order, seeded, so every
    rank draws the same set without communicating (round as partition.sample_clients does)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the fraction of malicious clients must be in [0, 1), got {fraction}")
    k = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, 0xBAD])
    return np.sort(rng.choice(num_clients, k, replace=False))


def poison_update(kind: str, delta: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """The update a malicious client sends instead of its honest delta (a new array, same dtype).
    scale counts for signflip and scale; gaussian noise takes the norm of the delta itself."""
    delta = np.asarray(delta)
    if kind == "signflip":
        return (-scale * delta).astype(delta.dtype)
    if kind == "scale":
        return (scale * delta).astype(delta.dtype)
    if kind == "gaussian":
        z = rng.standard_normal(delta.shape)
        norm_z = np.linalg.norm(z)
        norm_delta = np.linalg.norm(delta.astype(np.float64))
        return (z * (norm_delta / norm_z if norm_z > 0 else 0.0)).astype(delta.dtype)
    if kind == "nan":
        return np.full_like(delta, np.nan)
    if kind in DATA_KINDS:
        raise ValueError(f"{kind} is a data attack: train the client on flip_labels(labels), "
                         f"do not poison its update")
    raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(KINDS)}")


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flipping: y -> num_classes - 1 - y (0 <-> 9, 1 <-> 8, ... on MNIST), same dtype."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return (num_classes - 1 - labels.astype(np.int64)).astype(labels.dtype)
