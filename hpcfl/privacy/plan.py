"""The differential privacy of one run (DpPlan): what --dp-* and the data make of it (the sampling
rate, the calibrated noise, the secret seed) and its running accountant."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UsageError
from .accountant import SECURE_QUANTILE, Accountant, AccountantProtocol, create_accountant

if TYPE_CHECKING:
    from ..config import Config
    from ..parallel.comm import Comm


@dataclass
class DpPlan:
    """The differential privacy of one run: the clip S (sensitivity), the noise multiplier z,
    the sampling rate q (clients per round in fl, samples per step in dp), the expected number
    sampled (the fixed denominator q N), the secret seed of the noise and of the sampling, and
    the running accountant."""
    clip: float
    z: float
    q: float
    expected: float
    noise_seed: int
    delta: float
    target: float | None = None        # --dp-epsilon: no round may take epsilon past it
    secure: bool = False               # DP-FedAvg under secure aggregation (SecureAccountant)
    share_std: float = 0.0             # secure: each client's noise share, per coordinate
    colluders: int = 0                 # secure: clients whose shares do not count (--dp-colluders)
    pca: int = 0                       # DP-SGD: --dp-pca K (0: off)
    pca_noise: float = 0.0             # its release's noise multiplier
    accountant: AccountantProtocol = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.accountant = self._new_accountant()
        if self.pca:                   # released once, before training, from every image
            assert isinstance(self.accountant, Accountant)
            self.accountant.compose(1.0, self.pca_noise, 1)

    def _new_accountant(self) -> AccountantProtocol:
        return create_accountant("secure" if self.secure else "rdp", self.delta, self.q, self.z)

    def honest_shares(self, survivors: int) -> int:
        """The noise shares of a round of `survivors` that protect a client: not its own, not
        the colluders'."""
        return max(0, survivors - 1 - self.colluders)

    def round_noise(self, survivors: int) -> float:
        """The noise multiplier a secure round of `survivors` is accounted with."""
        return self.share_std * math.sqrt(self.honest_shares(survivors)) / self.clip

    def compose_round(self, z: float) -> None:
        """One more DP-SGD step or DP-FedAvg round at noise multiplier z."""
        self.accountant.step(z)

    def epsilon_after(self, z: float) -> float:
        """Epsilon after one more step or round at z: what a round is checked with before it
        is released."""
        return self.accountant.epsilon_after(z)

    def summary(self) -> dict:
        """What a run reports of its privacy at the end (Result.extra)."""
        return {"dp_epsilon": self.accountant.epsilon(), "dp_noise": self.z, "dp_delta": self.delta}

    def state(self) -> dict:
        """What a checkpoint keeps: the seed (whoever holds a checkpoint can remove the noise:
        README) and the privacy spent so far."""
        return {"noise_seed": self.noise_seed, "z": self.z, **self.accountant.state()}

    def load_state(self, state: dict) -> None:
        self.noise_seed = int(state["noise_seed"])
        self.accountant = self._new_accountant()
        self.accountant.load_state(state)


def dp_sampling(cfg: Config, n_train: int) -> tuple[float, int, float]:
    """(q, steps, expected) of a DP run: the sampling rate, the steps (dp) or rounds (fl) the
    noise is calibrated for, and the expected count sampled (the fixed denominator)."""
    if cfg.mode == "fl":
        return cfg.client_fraction, cfg.rounds, cfg.client_fraction * cfg.num_clients
    batch = cfg.batch_size
    steps = cfg.epochs * (n_train // batch)
    return batch / n_train, min(steps, cfg.max_steps) if cfg.max_steps else steps, float(batch)


def calibrate(cfg: Config, n_train: int) -> tuple[float, float]:
    """(DP-PCA's noise multiplier, 0 without it; z) that --dp-epsilon calibrates: pure, the same
    on every rank; a budget that cannot be met is a UsageError. Also --print-config's."""
    from ..config import pca_directions
    from . import accountant

    q, steps, _ = dp_sampling(cfg, n_train)
    target = float(cfg.dp_epsilon or 0.0)
    try:
        if cfg.mode == "fl" and cfg.secure_agg:
            return 0.0, accountant.calibrate_secure_noise(q, steps, cfg.dp_delta, target)
        sigma = 0.0
        if pca_directions(cfg):
            sigma = cfg.dp_pca_noise or accountant.pca_noise_for(target, cfg.dp_delta)
        prior = [(1.0, sigma, 1)] if sigma else []
        return sigma, accountant.calibrate_noise(q, steps, cfg.dp_delta, target, prior=prior)
    except ValueError as exc:
        raise UsageError(f"--dp-epsilon {cfg.dp_epsilon:g}: {exc}") from None


def create_plan(cfg: Config, comm: Comm, n_train: int) -> DpPlan | None:
    """The run's DpPlan, or None without DP: the sampling rate, the expected count, the noise
    multiplier (calibrated on rank 0 for --dp-epsilon: a second or two) and the secret seed of
    the noise and of the sampling (rank 0 draws it, unless given). The same on every rank."""
    import secrets

    from ..config import dp_on, pca_directions

    if not dp_on(cfg):
        return None
    q, _, expected = dp_sampling(cfg, n_train)
    secure = cfg.mode == "fl" and cfg.secure_agg
    if cfg.dp_noise is not None:
        z, pca_noise = cfg.dp_noise, cfg.dp_pca_noise or 0.0
    else:
        pca_noise, z = comm.agree(lambda: calibrate(cfg, n_train))
    clip = float(cfg.dp_clip or 0.0)
    share_std = _share_std(cfg, q, z * clip) if secure else 0.0
    # 256 bits from the OS (the noise's AES keys derive from it), unless given to reproduce a run
    seed = cfg.dp_noise_seed if cfg.dp_noise_seed is not None else comm.bcast(
        secrets.randbits(256) if comm.rank == 0 else None)
    return DpPlan(clip=clip, z=z, q=q, expected=expected, noise_seed=seed, delta=cfg.dp_delta,
                  target=cfg.dp_epsilon, secure=secure, share_std=share_std, colluders=cfg.dp_colluders,
                  pca=pca_directions(cfg), pca_noise=pca_noise)


def _share_std(cfg: Config, q: float, total_std: float) -> float:
    """Each client's noise share under secure aggregation, sized so that a low quantile of the
    honest survivors still adds up to the planned noise."""
    from .sampling import honest_quantile

    honest = honest_quantile(cfg.num_clients, q, cfg.dropout_rate, cfg.dp_colluders)
    if honest < 1:
        raise UsageError(f"DP with --secure-agg: in {100 * SECURE_QUANTILE:g}% of rounds at most "
                         f"{honest + 1 + cfg.dp_colluders} of the {cfg.num_clients} clients survive "
                         f"(--client-fraction {q:g}, --dropout-rate {cfg.dropout_rate:g}), which leaves no "
                         f"honest noise share besides a client's own once --dp-colluders "
                         f"{cfg.dp_colluders} are counted out: raise --client-fraction or --num-clients",
                         collective=True)
    return total_std / (honest ** 0.5)
