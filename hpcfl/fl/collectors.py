"""How the server (world rank 0) collects a round's client contributions.

One interface (Collector): every rank calls `begin`, the group leaders `add` each trained
client's update, then every rank calls `finish`, which returns on rank 0 the round's average
model (None: the round is skipped) and the round's RoundResult.

- PlainCollector: FedAvg in the clear. Leaders Reduce [sum_k n_k w_k | sum_k n_k | loss | seen]
  in float64 to rank 0 (McMahan et al. 2017).
- GatheredCollector: the robust rules, which need every update at the server.
- CentralDpCollector: DP-FedAvg with a trusted server (McMahan et al. 2018). Each client's delta
  w_k - w is clipped to L2 norm S; leaders Reduce the sum; rank 0 adds N(0, z^2 S^2) to every
  coordinate and divides by the expected number of clients q N (clients count equally).
- SecureCollector (secure.py): the server learns only the sum (secure aggregation).

Only parallel/ talks MPI: this module calls Comm's methods.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..parallel import wire
from ..privacy import mechanisms
from . import aggregators
from .context import ClientUpdate, FedContext, RoundResult

if TYPE_CHECKING:
    from ..config import Config
    from ..privacy.plan import DpPlan
    from ..runtime.testing import Hooks


class Collector(Protocol):
    def begin(self, server_round: int, global_w: np.ndarray, sampled: Sequence[int], dropped: set[int],
              owners: list[list[int]]) -> None:
        """A new round: the global model the clients start from, who was sampled and who drops
        out, and which clients each group trains (owners[g]: group g's, in training order)."""

    def add(self, update: ClientUpdate) -> None:
        """One trained client's contribution (its group's leader calls this)."""

    def finish(self, server_round: int, clients: int) -> tuple[np.ndarray | None, RoundResult]:
        """Collective: on rank 0 the round's new average model (None: skipped) and its result;
        elsewhere (None, an empty RoundResult)."""


def rejection(delta: np.ndarray, loss_sum: float, n: int, max_norm: float | None) -> str | None:
    """Why the server rejects a client's contribution (aggregators.validate, and a NaN/Inf
    training loss: a client whose local training diverged), or None."""
    if not math.isfinite(loss_sum):
        return f"its training loss is {loss_sum}"
    return aggregators.validate(delta, n, max_norm)


def skipped(result: RoundResult, why_if_rejected: str = "every update was rejected") -> RoundResult:
    result.skipped = why_if_rejected if result.rejected else "no client reported"
    return result


class PlainCollector:
    """The weighted mean in the clear (FedAvg), through one Reduce of float64 sums:
    [sum n_k d_k | sum n_k | sum n_k tau_k | loss | seen | rejected non-finite] where d_k is the
    client's delta w_k - w (clipped to --max-update-norm with --aggregator norm-bounded), divided
    by its local steps tau_k with stragglers (FedNova, Wang et al. 2020: the mean is then scaled by
    tau_eff = sum n_k tau_k / sum n_k). Each update is validated before it enters the sum: the
    server's check, run on the rank that relays the update (the Reduce is only transport)."""

    def __init__(self, ctx: FedContext, cfg: Config | None = None):
        self.ctx, self.cfg, n = ctx, cfg, ctx.n
        self.fednova = bool(cfg and cfg.straggler_rate > 0)
        self.clip = cfg.max_update_norm if cfg and cfg.aggregator == "norm-bounded" else None
        self.max_norm = cfg.max_update_norm if cfg and cfg.aggregator != "norm-bounded" else None
        self.extra = n + 1 if cfg and cfg.scaffold else 0         # SCAFFOLD: sum of dc_k, count
        self.sendbuf = np.zeros(n + 5 + self.extra, np.float64)
        self.recvbuf = np.zeros_like(self.sendbuf) if ctx.comm.rank == 0 else None
        self._delta = np.empty(n, np.float64)       # add()'s work buffer: no allocation per client
        self.rejected: list[tuple[int, str]] = []
        self.global_w = np.zeros(0, np.float64)

    def begin(self, server_round: int, global_w: np.ndarray, sampled: Sequence[int], dropped: set[int],
              owners: list[list[int]]) -> None:
        self.sendbuf[...] = 0
        self.rejected = []
        self.global_w = global_w

    def add(self, update: ClientUpdate) -> None:
        n, buf, u = self.ctx.n, self.sendbuf, update
        delta = np.subtract(u.params, self.global_w, out=self._delta, dtype=np.float64)
        why = rejection(delta, u.loss_sum, n, self.max_norm)
        if why is not None:
            self.rejected.append((u.client, why))
            buf[n + 4] += not (np.isfinite(delta).all() and math.isfinite(u.loss_sum))
            return
        if self.clip is not None:
            delta, _ = mechanisms.clip_l2(delta, self.clip)
        # in place: delta is the work buffer (or clip's copy)
        delta *= u.num_examples / u.steps if self.fednova else u.num_examples
        buf[:n] += delta
        buf[n:n + 4] += (u.num_examples, u.num_examples * u.steps, u.loss_sum, u.seen)
        if u.scaffold_dc is not None:
            buf[n + 5:-1] += u.scaffold_dc
            buf[-1] += 1

    def _reduce(self) -> np.ndarray | None:
        ctx = self.ctx
        if ctx.leader:
            ctx.leaders.Reduce_sum(self.sendbuf, self.recvbuf, root=0)
        return self.recvbuf

    def _rejections(self) -> list:
        """Every leader's rejected clients, on rank 0 (one small gather of pickled lists)."""
        ctx = self.ctx
        if not ctx.leader:
            return []
        lists = ctx.leaders.gather(self.rejected)
        return sorted(r for part in lists for r in part) if lists is not None else []

    def finish(self, server_round, clients):
        rejected = self._rejections()
        total = self._reduce()
        if total is None:                           # not rank 0
            return None, RoundResult()
        n = self.ctx.n
        result = RoundResult(loss_sum=total[n + 2], seen=total[n + 3], rejected=rejected,
                             nonfinite=int(total[n + 4]),
                             bytes_to_server=min(self.ctx.n_groups, clients) * self.sendbuf[:n + 5].nbytes)
        if self.extra:
            result.scaffold = (total[n + 5:-1].copy(), int(total[-1]))
            result.bytes_to_server *= 2
        if total[n] == 0:
            return None, skipped(result)
        mean = total[:n] / total[n]
        if self.fednova:
            mean *= total[n + 1] / total[n]        # tau_eff
        return (self.global_w + mean).astype(np.float32), result


class GatheredCollector(PlainCollector):
    """The robust rules (median, trimmed mean, Krum, Multi-Krum) need every update at the server:
    the leaders Gatherv their clients' deltas (float32) to rank 0, which validates each one, stacks
    them (m, n) and applies the rule (aggregators.py). The cost (memory of the stack, gather and
    aggregation time) is in the round's record."""

    def begin(self, server_round: int, global_w: np.ndarray, sampled: Sequence[int], dropped: set[int],
              owners: list[list[int]]) -> None:
        self.parts: dict[int, bytes] = {}
        self.global_w = global_w

    def add(self, update: ClientUpdate) -> None:
        u = update
        delta = (u.params.astype(np.float64) - self.global_w).astype(np.float32)
        head = np.array([u.num_examples, u.steps, u.loss_sum, u.seen], np.float64).tobytes()
        self.parts[u.client] = head + delta.tobytes()

    def finish(self, server_round, clients):
        ctx, cfg = self.ctx, self.cfg
        assert cfg is not None
        t0 = time.perf_counter()
        got = ctx.leaders.gather_bytes(wire.encode_map(self.parts)) if ctx.leader else None
        if ctx.comm.rank != 0 or got is None:
            return None, RoundResult()
        result = RoundResult(bytes_to_server=sum(map(len, got)), gather_seconds=time.perf_counter() - t0)
        rows, weights, steps = self._validated(got, result)
        result.aggregate_memory_bytes = aggregators.memory_bytes(len(rows), ctx.n)
        if not rows:
            return None, skipped(result)
        deltas = np.stack(rows)
        if cfg.straggler_rate > 0:                # FedNova's normalisation, then the robust rule
            tau = np.array(steps)
            deltas = deltas / tau[:, None].astype(np.float32) * np.float32(tau.mean())
        t1 = time.perf_counter()
        try:
            agg = aggregators.aggregate(cfg.aggregator, deltas, np.array(weights), f=cfg.byzantine,
                                        beta=cfg.trim_fraction, m_select=cfg.krum_m, max_norm=cfg.max_update_norm)
        except ValueError as exc:                 # e.g. too few valid updates left for Krum's f
            result.skipped = f"--aggregator {cfg.aggregator}: {exc}"
            return None, result
        result.aggregate_seconds = time.perf_counter() - t1
        return (self.global_w + agg.astype(np.float64)).astype(np.float32), result

    def _validated(self, got: list[bytes], result: RoundResult) -> tuple[list, list, list]:
        """The gathered updates that pass validation (rows, weights, steps), in client order;
        the rest are counted in `result`, as are the loss and samples of the valid ones."""
        merged: dict[int, bytes] = {}
        for part in got:
            merged.update(wire.decode_map(part))
        rows, weights, steps = [], [], []
        loss, seen = 0.0, 0
        for k in sorted(merged):
            head = np.frombuffer(merged[k][:32], np.float64)
            delta = np.frombuffer(merged[k][32:], np.float32)
            why = rejection(delta, float(head[2]), self.ctx.n, self.cfg.max_update_norm if self.cfg else None)
            if why is not None:
                result.rejected.append((k, why))
                result.nonfinite += not (np.isfinite(delta).all() and math.isfinite(head[2]))
                continue
            rows.append(delta)
            weights.append(head[0])
            steps.append(head[1])
            loss, seen = loss + head[2], seen + int(head[3])
        result.loss_sum, result.seen = loss, seen
        return rows, weights, steps


class CentralDpCollector(PlainCollector):
    """Central DP: clip on the clients, noise on the (trusted) server, from the CSPRNG keyed by
    (the secret noise seed, the attempt, the round). The Reduce carries [sum clip(d_k) | count |
    clipped | loss | seen | rejected non-finite]; non-finite updates are rejected and count as
    zero. Every round releases (sum + noise) / qN, also when Poisson sampling drew nobody or
    every update was rejected: the accountant composes a Gaussian release each round, so the
    round must be one (an un-noised "model unchanged" would tell that nobody counted)."""

    def __init__(self, ctx: FedContext, plan: DpPlan):
        super().__init__(ctx, None)
        self.plan = plan

    def add(self, update: ClientUpdate) -> None:
        n, buf, u = self.ctx.n, self.sendbuf, update
        delta = u.params.astype(np.float64) - self.global_w
        why = rejection(delta, u.loss_sum, n, None)
        if why is not None:
            self.rejected.append((u.client, why))
            buf[n + 4] += 1
            return
        delta, norm = mechanisms.clip_l2(delta, self.plan.clip)
        buf[:n] += delta
        buf[n:n + 4] += (1, norm > self.plan.clip, u.loss_sum, u.seen)   # clipped: how often the clip bites

    def finish(self, server_round, clients):
        rejected = self._rejections()
        total = self._reduce()
        if total is None:
            return None, RoundResult()
        n, plan = self.ctx.n, self.plan
        result = RoundResult(dp_noise=plan.z, rejected=rejected, nonfinite=int(total[n + 4]))
        why = plan.over_budget(plan.z)             # the round is withheld if it would overshoot
        if why is not None:
            result.budget_stop = f"round {server_round}: {why}"
            return None, result
        from ..privacy import noise

        plan.reserve(server_round, 1, writer=True)  # in the ledger before it is released (rank 0)
        key = noise.derive_key(plan.noise_seed, "central", *plan.noise_ids, server_round)
        gaussian = noise.standard_normal(key, 0, n) * (plan.z * plan.clip)
        # the fixed denominator q N (not the count): the average's sensitivity stays S / (q N)
        return (self.global_w + (total[:n] + gaussian) / plan.expected).astype(np.float32), result


def kind(cfg: Config, plan: DpPlan | None) -> str:
    """Which collector a run's settings call for (a key of COLLECTORS)."""
    if cfg.secure_agg:
        return "secure"
    if plan is not None:
        return "central-dp"
    return "gathered" if aggregators.AGGREGATORS[cfg.aggregator].gathered else "plain"


def _central_dp(ctx: FedContext, cfg: Config, plan: DpPlan | None, hooks: Hooks) -> Collector:
    assert plan is not None, "central DP needs a DP plan"
    return CentralDpCollector(ctx, plan)


def _secure(ctx: FedContext, cfg: Config, plan: DpPlan | None, hooks: Hooks) -> Collector:
    from .secure import SecureCollector  # the cryptography package: only when asked for

    return SecureCollector(ctx, cfg, plan, hooks)


# (ctx, cfg, plan, hooks) -> Collector
COLLECTORS: dict[str, Callable[[FedContext, Config, DpPlan | None, Hooks], Collector]] = {
    "plain": lambda ctx, cfg, plan, hooks: PlainCollector(ctx, cfg),
    "gathered": lambda ctx, cfg, plan, hooks: GatheredCollector(ctx, cfg),
    "central-dp": _central_dp,
    "secure": _secure,
}


def create(ctx: FedContext, cfg: Config, plan: DpPlan | None, hooks: Hooks) -> Collector:
    """The collector for this run's settings."""
    return COLLECTORS[kind(cfg, plan)](ctx, cfg, plan, hooks)
