"""The differential privacy of one run (DpPlan): what --dp-* and the data make of it (the sampling
rate, the calibrated noise, the secret seed) and its running accountant."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from .accountant import SECURE_QUANTILE, Accountant, AccountantProtocol, create_accountant
from .ledger import Ledger

if TYPE_CHECKING:
    from ..config import Config
    from ..parallel.comm import Comm


RECALIBRATE_AT_MOST = 4.0      # a resumed run's noise rises at most this much; past it, the hard cap stops it


@dataclass
class DpPlan:
    """The differential privacy of one run: the clip S (sensitivity), the noise multiplier z,
    the sampling rate q (clients per round in fl, samples per step in dp), the expected number
    sampled (the fixed denominator q N), the secret seed of the noise and of the sampling, and
    the running accountant.

    Every release is written to the run's ledger (ledger.py) before it happens, and a resumed
    run composes the ledger (every attempt's releases), not the checkpoint's copy. Each attempt
    of a resumed run keys its noise and sampling afresh (`attempt`), unless the run reproduces
    one from --dp-noise-seed (`attempt` None: a redone release is then the same release)."""
    clip: float
    z: float
    q: float
    expected: float
    noise_seed: int
    delta: float
    target: float | None = None        # --dp-epsilon: no round may take epsilon past it
    secure: bool = False               # DP-FedAvg under secure aggregation (the clients' own ledgers)
    share_std: float = 0.0             # secure: each client's noise share, per coordinate
    colluders: int = 0                 # secure: clients whose shares do not count (--dp-colluders), at least
    corrupt_fraction: float = 0.0      # secure: ... and this share of a round's clients (--secagg-corrupt-fraction)
    accept_honest: int = 0             # secure: honest shares besides a client's own a released round needs
    pca: int = 0                       # DP-SGD: --dp-pca K (0: off)
    pca_noise: float = 0.0             # its release's noise multiplier
    seeded: bool = False               # --dp-noise-seed: a reproducible run (kept in its checkpoints)
    attempt: int | None = 0            # the attempt of a resumed run (its noise's key); None: seeded
    accountant: AccountantProtocol = field(init=False, repr=False)
    ledger: Ledger = field(init=False, repr=False)
    _from_ledger: set = field(init=False, repr=False, default_factory=set)   # (unit, noise, z) composed already

    def __post_init__(self) -> None:
        self.ledger = Ledger(None)
        self.accountant = self._new_accountant()

    def _new_accountant(self) -> AccountantProtocol:
        acc = create_accountant("clients" if self.secure else "rdp", self.delta, self.q, self.z)
        if self.pca:                   # released once, before training, from every image
            assert isinstance(acc, Accountant)
            acc.compose(1.0, self.pca_noise, 1)
        return acc

    @property
    def noise_ids(self) -> tuple[int, ...]:
        """What keys an attempt's noise and sampling besides the seed: its number (none when
        seeded)."""
        return () if self.attempt is None else (self.attempt,)

    @property
    def noise_name(self) -> str:
        return "seeded" if self.attempt is None else str(self.attempt)

    # ---- secure aggregation: what a round's survivors give, as every client computes it
    def corrupt(self, sampled: int) -> int:
        """Colluders assumed among a round's `sampled` clients."""
        from .sampling import corrupt_count

        return corrupt_count(sampled, self.colluders, self.corrupt_fraction)

    def min_survivors(self, sampled: int) -> int:
        """The fewest survivors whose honest shares make up the planned noise: clients refuse a
        view with fewer (what the shares are sized for, which the server cannot undercut)."""
        return self.accept_honest + 1 + self.corrupt(sampled)

    def honest_shares(self, survivors: int, sampled: int | None = None) -> int:
        """The noise shares of a round of `survivors` that protect a client: not its own, not
        the colluders'."""
        return max(0, survivors - 1 - self.corrupt(survivors if sampled is None else sampled))

    def round_noise(self, survivors: int, sampled: int | None = None) -> float:
        """The noise multiplier a secure round of `survivors` carries for each client."""
        return self.share_std * math.sqrt(self.honest_shares(survivors, sampled)) / self.clip

    def out_of_budget(self, sampled: int, refused: int) -> bool:
        """Whether a secure round skipped while `refused` of its `sampled` clients stayed out for
        their budgets ends training: at that share of clients still able to pay, a round of the
        expected size would fall short of min_survivors. (A few refusals in a short round only
        skip it: clients sampled more often than planned run out first, late in a run.)"""
        if not refused:
            return False
        expected = max(2, round(self.expected))
        return (sampled - refused) / sampled * expected < self.min_survivors(expected)

    @property
    def round_mu2(self) -> float:
        """What one round a client joins costs it in Gaussian DP (mu^2): 1 / z^2 at the fewest
        honest shares it accepts, z = share_std sqrt(accept_honest) / S = the planned z."""
        return 1.0 / self.z ** 2 if self.z > 0 else math.inf

    @property
    def mu2_budget(self) -> float | None:
        """A client's whole budget in mu^2 (the mu of --dp-epsilon at delta), None without one."""
        if self.target is None:
            return None
        from .accountant import gdp_mu

        return gdp_mu(self.target, self.delta) ** 2

    # ---- the run's accountant (DP-SGD, central DP-FedAvg)
    def compose_round(self, z: float, unit: int | None = None) -> None:
        """One more DP-SGD step or DP-FedAvg round at noise multiplier z; a unit a seeded run
        redoes with the same noise was composed from the ledger already (the same release)."""
        if unit is not None and (unit, self.noise_name, float(z)) in self._from_ledger:
            return
        self.accountant.step(z)

    def epsilon_after(self, z: float) -> float:
        """Epsilon after one more step or round at z: what a round is checked with before it
        is released."""
        return self.accountant.epsilon_after(z)

    def over_budget(self, z: float) -> str | None:
        """Why one more step or round at z must not be released (past --dp-epsilon), or None."""
        if self.target is None:
            return None
        eps = self.epsilon_after(z)
        return None if eps <= self.target * (1 + 1e-9) else \
            f"one more would take epsilon to {eps:.4g}, past --dp-epsilon {self.target:g}"

    def reserve(self, unit: int, count: int, writer: bool) -> None:
        """Writes units unit..unit+count-1 (steps or rounds) to the ledger before they are
        released (rank 0 writes; every rank composes them as they happen)."""
        if writer and count > 0:
            self.ledger.append({"release": "rdp", "unit": int(unit), "count": int(count), "q": self.q,
                                "z": self.z, "noise": self.noise_name, "attempt": self.attempt})

    def settle(self, unit: int, count: int, writer: bool) -> None:
        """Of the reservation at `unit`, only `count` units were released (a stop inside it)."""
        if writer:
            self.ledger.append({"settle": int(unit), "count": int(count), "attempt": self.attempt})

    def open_ledger(self, comm: Comm, directory: str | None, seeded: bool) -> None:
        """The ledger of --checkpoint-dir (memory without one): starts this attempt (its number
        keys the noise, unless seeded) and rebuilds the accountant from every earlier release.
        Collective: rank 0 reads and writes, every rank gets the same."""
        from . import ledger as ledger_mod

        def begin():
            book = Ledger(Path(directory) / ledger_mod.FILE if directory else None)
            return book.start(), book.entries()

        attempt, entries = comm.agree(begin)
        if comm.rank == 0:
            self.ledger = Ledger(Path(directory) / ledger_mod.FILE if directory else None)
        self.attempt = None if seeded else int(attempt)
        released = ledger_mod.released_units(entries)
        if not self.secure and released:     # (a checkpoint from before ledgers keeps its own events)
            self._from_ledger = set(released)
            self.accountant = self._new_accountant()
            for q, z, count in ledger_mod.rdp_events(entries):
                assert isinstance(self.accountant, Accountant)
                self.accountant.compose(q, z, count)

    def start_attempt(self, comm: Comm, directory: str | None, changed: list[str], remaining: int) -> str | None:
        """A run's privacy as it (re)starts: with --dp-noise-seed a resumed run redoes its
        releases exactly, so no setting that would change one may differ (the same noise on
        other data would cancel out); then the ledger (open_ledger) and, where needed, a
        recalibrated z for the `remaining` units. Returns what to tell the user, or None."""
        if self.seeded and changed:
            raise UsageError(f"a run reproduced from --dp-noise-seed redoes the releases since its checkpoint "
                             f"with the same noise, so they must be the same releases, and this resume changes "
                             f"{changed[0]}: resume with the checkpoint's settings (or start a run without "
                             f"--dp-noise-seed: fresh noise for every attempt, every release composed)",
                             collective=True)
        self.open_ledger(comm, directory, self.seeded)
        return self.recalibrate(remaining)

    def recalibrate(self, remaining: int) -> str | None:
        """After a resume: if the releases left at this z would pass --dp-epsilon (the run was
        lengthened, or releases made before a crash are composed now), a larger z for the
        `remaining` units with the ledger's releases as the prior, up to RECALIBRATE_AT_MOST times
        the noise; beyond that z stays and the hard cap stops training where the budget ends.
        Returns what it did, or None."""
        if self.target is None or remaining <= 0 or self.secure:
            return None
        assert isinstance(self.accountant, Accountant)
        spent = [(q, z, c) for (q, z), c in self.accountant.events.items()]
        target = self.target
        from . import accountant

        def fits(z: float) -> bool:
            return accountant.epsilon([*spent, (self.q, z, remaining)], self.delta) <= target

        if fits(self.z):
            return None
        so_far = f"the releases so far spend epsilon {self.accountant.epsilon():.4g} of --dp-epsilon {self.target:g}"
        lo, hi = self.z, self.z * RECALIBRATE_AT_MOST
        if not fits(hi):
            return (f"{so_far}; the {remaining} left would need more than {RECALIBRATE_AT_MOST:g}x the noise "
                    f"(z {self.z:.4g}): z stays, and training stops where the budget ends")
        while hi > lo * 1.001:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        old, self.z = self.z, hi
        return (f"z recalibrated from {old:.4g} to {self.z:.4g} so that the {remaining} left end within budget "
                f"({so_far})")

    def summary(self) -> dict:
        """What a run reports of its privacy at the end (Result.extra)."""
        return {"dp_epsilon": self.accountant.epsilon(), "dp_noise": self.z, "dp_delta": self.delta}

    def state(self) -> dict:
        """What a checkpoint keeps: the seed (whoever holds a checkpoint can remove the noise:
        docs/privacy.md), the noise in use and the privacy spent up to it (the ledger, not this, is what
        a resumed run composes)."""
        return {"noise_seed": self.noise_seed, "z": self.z, "seeded": self.seeded, **self.accountant.state()}

    def load_state(self, state: dict) -> None:
        self.noise_seed = int(state["noise_seed"])
        self.seeded = bool(state.get("seeded", False))     # (a checkpoint from before: fresh noise)
        self.z = float(state.get("z", self.z))
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
            return 0.0, accountant.calibrate_filter_noise(q, steps, cfg.dp_delta, target)
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
    honest = _accepted_honest(cfg, q) if secure else 0
    # 256 bits from the OS (the noise's AES keys derive from it), unless given to reproduce a run
    seed = cfg.dp_noise_seed if cfg.dp_noise_seed is not None else comm.bcast(
        secrets.randbits(256) if comm.rank == 0 else None)
    return DpPlan(clip=clip, z=z, q=q, expected=expected, noise_seed=seed, delta=cfg.dp_delta,
                  target=cfg.dp_epsilon, secure=secure, share_std=z * clip / honest ** 0.5 if secure else 0.0,
                  colluders=cfg.dp_colluders, corrupt_fraction=cfg.secagg_corrupt_fraction if secure else 0.0,
                  accept_honest=honest, pca=pca_directions(cfg), pca_noise=pca_noise,
                  seeded=cfg.dp_noise_seed is not None)


def _accepted_honest(cfg: Config, q: float) -> int:
    """Under secure aggregation: the honest noise shares besides its own that a client requires
    of a round before its input is unmasked, the 5% quantile of what rounds bring (rounds with
    fewer are not released). Each client's share is sized so that this many make up the planned
    noise: the worst case a client accepts, which a server naming fewer survivors cannot undercut."""
    from .sampling import honest_quantile

    honest = honest_quantile(cfg.num_clients, q, cfg.dropout_rate, cfg.dp_colluders,
                             corrupt_fraction=cfg.secagg_corrupt_fraction)
    if honest < 1:
        raise UsageError(f"DP with --secure-agg: in {100 * SECURE_QUANTILE:g}% of rounds no honest noise "
                         f"share besides a client's own survives (--num-clients {cfg.num_clients}, "
                         f"--client-fraction {q:g}, --dropout-rate {cfg.dropout_rate:g}, with --dp-colluders "
                         f"{cfg.dp_colluders} and --secagg-corrupt-fraction {cfg.secagg_corrupt_fraction:g} "
                         f"counted out): raise --client-fraction or --num-clients", collective=True)
    return honest


# what DP-FedAvg needs to learn: PRIVACY.md's runs reach 93% and more at epsilon 8 with 300 expected
# clients per round (N = 6000, q = 0.05); at 50 (N = 1000) 92.7%; far fewer and the noise on the
# average, z S / (q N), swamps the clients' updates
DP_SCALE_CLIENTS = 50


def scale_warning(cfg: Config) -> str | None:
    """Before training: why client-level DP at this scale will barely learn, and what it needs."""
    if cfg.mode != "fl":
        return None
    expected = cfg.client_fraction * cfg.num_clients
    if expected >= DP_SCALE_CLIENTS:
        return None
    need_n = math.ceil(DP_SCALE_CLIENTS / cfg.client_fraction)
    need_q = DP_SCALE_CLIENTS / cfg.num_clients
    raise_q = f" or --client-fraction {need_q:.3g}" if need_q <= 1 else ""
    return (f"client-level DP with {expected:g} expected clients per round: the noise on their average, "
            f"z S / (q N), is {DP_SCALE_CLIENTS / expected:.3g}x what it is at {DP_SCALE_CLIENTS} clients per round "
            f"and will swamp their updates (benchmarks/PRIVACY.md: 92.7% at epsilon 8 with 50 per round, 94.8% "
            f"with 300); DP at this scale needs --num-clients {need_n}{raise_q}")


def report(cfg: Config, n_train: int) -> list[str]:
    """`hpcfl privacy`: what these settings give, without training: epsilon at delta for a given
    noise, or the noise a target epsilon calibrates to, and the accountant behind it."""
    from ..config import pca_directions
    from . import accountant

    q, steps, expected = dp_sampling(cfg, n_train)
    if cfg.dp_epsilon is not None:
        sigma, z = calibrate(cfg, n_train)
    else:
        sigma, z = cfg.dp_pca_noise or 0.0, float(cfg.dp_noise or 0.0)
    unit = "rounds" if cfg.mode == "fl" else "steps"
    lines = []
    if cfg.mode == "fl" and cfg.secure_agg:
        lines += _secure_report(cfg, q, steps, z)
    else:
        events = ([(1.0, sigma, 1)] if sigma else []) + [(q, z, steps)]
        eps = accountant.epsilon(events, cfg.dp_delta)
        who = ("DP-SGD, per training sample" if cfg.mode == "dp"
               else "DP-FedAvg, per client, central (the server adds the noise)")
        lines.append(f"{who}: Poisson sampling q = {q:.6g} ({expected:g} expected per {unit[:-1]}), "
                     f"{steps} {unit}, clip {cfg.dp_clip:g}")
        if sigma:
            lines.append(f"DP-PCA: {pca_directions(cfg)} directions, its release's noise multiplier {sigma:.6g}")
        lines.append(f"noise multiplier z = {z:.6g}" + (f" (calibrated to --dp-epsilon {cfg.dp_epsilon:g})"
                                                        if cfg.dp_epsilon is not None else ""))
        lines.append(f"epsilon = {eps:.6g} at delta = {cfg.dp_delta:g}")
        lines.append("accountant: dp-accounting's RDP accountant, PoissonSampledDpEvent(q, GaussianDpEvent(z)) "
                     f"composed {steps} times" + (", after GaussianDpEvent(sigma) for DP-PCA" if sigma else ""))
    warning = scale_warning(cfg) if cfg.mode == "fl" else None
    return lines + ([f"warning: {warning}"] if warning else [])


def _secure_report(cfg: Config, q: float, rounds: int, z: float) -> list[str]:
    from . import accountant

    k = accountant.planned_participation(q, rounds)
    honest = _accepted_honest(cfg, q)
    lines = [f"DP-FedAvg under secure aggregation, per client (zero-out relation, public participation): "
             f"Poisson sampling q = {q:g} ({q * cfg.num_clients:g} expected clients per round), {rounds} rounds, "
             f"clip {cfg.dp_clip:g}",
             f"noise multiplier z = {z:.6g} per round a client joins" + (
                 f" (calibrated to --dp-epsilon {cfg.dp_epsilon:g}: a client can join {k} rounds, the 95% quantile "
                 f"of Binomial({rounds}, {q:g}))" if cfg.dp_epsilon is not None else ""),
             f"each client's noise share: std z S / sqrt({honest}), {honest} honest shares besides its own (the 5% "
             f"quantile a round brings; rounds with fewer are not released)"]
    for joined in sorted({1, k, rounds}):
        eps = accountant.gdp_epsilon(math.sqrt(joined) / z, cfg.dp_delta) if z > 0 else math.inf
        lines.append(f"a client that joins {joined} round{'s' if joined > 1 else ''}: epsilon = {eps:.6g} at "
                     f"delta = {cfg.dp_delta:g}")
    if cfg.dp_epsilon is not None:
        most = math.floor(accountant.gdp_mu(cfg.dp_epsilon, cfg.dp_delta) ** 2 * z ** 2 * (1 + 1e-9))
        lines.append(f"each client's own ledger stops it after {most} rounds: no client passes --dp-epsilon "
                     f"{cfg.dp_epsilon:g}")
    lines.append("accountant: each client's Gaussian-DP ledger (mu^2 adds up over the rounds it joins), "
                 "epsilon from the Gaussian mechanism's exact profile (Balle and Wang 2018)")
    return lines
