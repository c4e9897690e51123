"""What the parts of a federated round hand each other: the federation as the server-side parts
see it (FedContext), one trained client's contribution (ClientUpdate) and what the server makes
of a round (RoundResult). Plain data, no behaviour."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..parallel.comm import Comm


@dataclass
class FedContext:
    """The federation as collectors and SCAFFOLD see it (built once by the Federation)."""
    comm: Comm                    # every rank; world rank 0 is the server
    leaders: Comm                 # one rank per client group: rank g leads group g (0: the server)
    leader: bool                  # this rank leads its client group
    group: int                    # this rank's client group
    n_groups: int
    n: int                        # model parameters
    sizes: np.ndarray             # (num_clients,) examples of each client
    # the clients each group always trains (secure aggregation: the group's leader holds their
    # identity keys; SCAFFOLD: their c_i never move), or None: assigned afresh every round
    home: list[list[int]] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.sizes)


@dataclass
class ClientUpdate:
    """One client's contribution to a round, on its group's leader."""
    client: int
    params: np.ndarray            # (n,) float32: the client's model after local training
    num_examples: int             # n_k, its weight in FedAvg
    loss_sum: float               # summed training loss (NaN/inf: its training diverged)
    seen: int                     # samples trained on
    steps: int = 1                # local steps tau_k (FedNova's normaliser for stragglers)
    scaffold_dc: np.ndarray | None = None   # SCAFFOLD: delta c_i


@dataclass
class RoundResult:
    """What the server made of a round; collected on rank 0, then broadcast to every rank."""
    loss_sum: float = 0.0
    seen: float = 0
    rejected: list[tuple[Any, str]] = field(default_factory=list)   # (client or "?", why)
    nonfinite: int = 0            # rejected because their training diverged
    bytes_to_server: int = 0
    bytes_from_server: int = 0
    skipped: str | None = None    # why no model was built (the global model stays)
    error: str | None = None      # why the round failed (every rank raises it)
    budget_stop: str | None = None    # the round would pass --dp-epsilon: withheld, training stops
    gather_seconds: float | None = None       # robust rules: the updates' gather
    aggregate_seconds: float | None = None
    aggregate_memory_bytes: int | None = None
    secagg_seconds: float = 0.0
    secagg_stages: dict[str, float] = field(default_factory=dict)
    secagg_clipped: int = 0       # coordinates the secure range cut (without DP)
    server_attack: dict | None = None         # --server-attack: what the simulated server got
    dp_noise: float | None = None             # the noise multiplier the round is accounted with
    dp_mu2: float | None = None               # secure DP: the largest spend in the clients' own ledgers
    clipped: int | None = None    # DP: updates the L2 clip shortened
    scaffold: tuple[np.ndarray, int] | None = None   # rank 0: (sum of delta c_i, count)
    norm: float = math.nan        # the global model's L2 norm after the server step
    server_ratio: float | None = None         # the server step's length / the clients' mean one

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.seen if self.seen else None
