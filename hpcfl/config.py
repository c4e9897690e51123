"""All settings of a run in one frozen dataclass: saved with every checkpoint and result."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Config:
    mode: str = "dp"                      # dp | fl
    # model and optimisation
    hidden: tuple[int, ...] = (256, 128)
    epochs: int = 12
    batch_size: int = 128                 # the GLOBAL batch in dp mode
    optimizer: str = "sgd"                # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"              # cosine | constant
    max_steps: int | None = None
    # federated (fl mode)
    rounds: int = 50
    num_clients: int = 100
    ranks_per_client: int = 1
    client_fraction: float = 0.1
    partition: str = "iid"                # iid | shards | dirichlet
    alpha: float = 0.5
    local_epochs: int = 1
    local_batch_size: int = 10
    local_lr: float = 0.1
    mu: float = 0.0                       # FedProx proximal term
    server_opt: str = "fedavg"            # fedavg | fedavgm | fedadam
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_eps: float = 1e-3
    eval_every: int = 1
    target_accuracy: float | None = None  # stop once the test accuracy reaches this
    # machinery
    backend: str = "auto"
    threads: int = 1
    allreduce: str = "fused"              # fused: one blocking Allreduce per step | overlap: one
                                          # Iallreduce per layer during backward (benchmarks/RESULTS.md)
                                          # | nccl: one NCCL allreduce per step (backend cupy)
    seed: int = 0
    data_dir: str | None = None
    metrics: str | None = None
    out: str | None = None
    quiet: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0             # 0: only at the end / on preemption
    keep_checkpoints: int = 2
    resume: bool = False

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def validate(cfg: Config, world_size: int) -> None:
    """Checks that depend on the world size; raises UsageError (the same on every rank)."""
    if cfg.mode == "dp" and cfg.batch_size < world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the number of ranks "
                         f"({world_size}): every rank needs at least one sample per step")
    if cfg.mode == "fl":
        if world_size % cfg.ranks_per_client:
            raise UsageError(f"--ranks-per-client {cfg.ranks_per_client} does not divide the "
                             f"number of ranks ({world_size})")
        if cfg.local_batch_size < cfg.ranks_per_client:
            raise UsageError(f"--local-batch-size {cfg.local_batch_size} is smaller than "
                             f"--ranks-per-client {cfg.ranks_per_client}")
    if not 0.0 < cfg.client_fraction <= 1.0:
        raise UsageError(f"--client-fraction must be in (0, 1], got {cfg.client_fraction}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir")
    if cfg.checkpoint_every and not cfg.checkpoint_dir:
        raise UsageError("--checkpoint-every needs --checkpoint-dir")
