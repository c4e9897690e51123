"""Federated training (FedAvg and friends) over MPI.

Ranks form client groups of --ranks-per-client R (Comm.Split); inside a group, a client trains
data parallel exactly as in dp mode. Each round (McMahan et al. 2017, Algorithm 1):
  1. sample: every rank draws the same clients (seeded by the round, no communication),
  2. train: each group trains its share of the sampled clients in turn, for --local-epochs E from
     the global model (plain SGD, batch --local-batch-size B, optional FedProx term),
  3. aggregate: the collector (fl/collectors.py, fl/secure.py) brings the updates to rank 0, the
     server, which averages and applies its optimizer,
  4. broadcast: the new global model (and SCAFFOLD's c) to every rank,
  5. record: the round's metrics; every --eval-every rounds each rank scores its slice of the
     test set with the global model.
A stop signal (preemption) is agreed within one local step: the group's step Allreduce carries
the votes, comm.StopNotice tells the other groups; the round is then abandoned and the run
checkpoints the state at its start, so a resumed run redoes it bitwise. The loop around the
rounds (stopping, checkpoints, the end) is loop.py's, shared with dp.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import layout as model_layout
from ..core.replica import FedProx, Replica
from ..errors import TrainingError, UsageError, computed_alike
from ..fl import aggregators, attacks, collectors, partition, server_opt
from ..fl.context import ClientUpdate, FedContext, RoundResult
from ..fl.scaffold import Scaffold
from ..io import checkpoint
from ..parallel.comm import StopNotice
from ..parallel.sync import gradient_reducer
from ..runtime import preempt, testing, watchdog
from ..runtime.testing import NO_HOOKS, Hooks
from . import loop

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..config import Config
    from ..core.layout import Layout
    from ..data.cache import Dataset
    from ..io.report import Reporter
    from ..parallel.comm import Comm
    from ..privacy.plan import DpPlan

logger = logging.getLogger(__name__)
DIVERGED_ROUNDS = 3      # most clients non-finite this many rounds in a row: training is diverging


@dataclass
class ClientJob:
    """One client's local training in a round."""
    server_round: int
    client: int
    idx: np.ndarray                   # its samples
    labels: Any = None                # the labels it trains on (None: the data's; a label-flipper's)
    max_steps: int | None = None      # a straggler stops after this many local steps


@dataclass
class LocalResult:
    loss_sum: float
    seen: int
    stopped: bool                     # the group agreed on a stop signal (training ended at once)
    steps: int


def client_update(rep: Replica, comm: Comm, data: Dataset, cfg: Config, job: ClientJob,
                  notice: StopNotice | None = None) -> LocalResult:
    """Local training of one client from the weights in rep.

    The batch order is seeded by (seed, round, client, local epoch); the last batch of an
    epoch may be smaller (clients of a non-IID split can hold fewer samples than a batch, and
    a batch larger than the client is the whole client: full-batch gradient descent).
    """
    B, loss_sum, seen, steps = cfg.local_batch_size, 0.0, 0, 0
    labels = data.train_y if job.labels is None else job.labels
    for e in range(cfg.local_epochs):
        rng = np.random.default_rng([cfg.seed, job.server_round, job.client, e])
        order = rep.backend.to_device(job.idx[rng.permutation(len(job.idx))])   # on a GPU: one upload per epoch
        for start in range(0, len(order), B):
            if job.max_steps is not None and steps >= job.max_steps:
                return LocalResult(loss_sum, seen, False, steps)
            batch = order[start:start + B]
            stop = preempt.requested() is not None
            if notice is not None:
                if stop:
                    notice.notify()                   # the other client groups hear it
                stop = stop or notice.heard()
            loss = rep.step(comm, data.train_x, labels, batch, cfg.local_lr, stop=stop)
            loss_sum += loss * len(batch)
            seen += len(batch)
            steps += 1
            if rep.stop_agreed:
                return LocalResult(loss_sum, seen, True, steps)
            if not math.isfinite(loss):
                # Only this client's ranks know: its update is rejected at the server (the
                # NaN loss travels with it), and the round goes on without it.
                return LocalResult(loss_sum, seen, False, steps)
    return LocalResult(loss_sum, seen, False, steps)


def local_steps(cfg: Config, size: int) -> int:
    """Local SGD steps of a client of `size` samples in one round."""
    return cfg.local_epochs * math.ceil(size / cfg.local_batch_size)


@dataclass
class RoundPlan:
    """Who takes part in a round and how (the same on every rank, computed without messages)."""
    sampled: np.ndarray
    dropped: set[int]
    groups: list[list[int]]           # groups[g]: the clients group g trains, in order
    stragglers: dict[int, float]      # client -> the share of its local steps it finishes


class Federation:
    """The state of a federated run on this rank (loop.Trainer: one unit is a round): its client
    group, the partition, a model replica for local training, the global model (on every rank),
    the server optimizer (rank 0), the collector and the privacy plan."""
    unit = "round"

    def __init__(self, cfg: Config, comm: Comm, data: Dataset, backend: Backend, layout: Layout | None = None,
                 plan: DpPlan | None = None, hooks: Hooks = NO_HOOKS):
        self.cfg, self.comm, self.data, self.backend, self.plan, self.hooks = cfg, comm, data, backend, plan, hooks
        self.parts = computed_alike(lambda: partition.create(cfg.partition, backend.to_host(data.train_y),
                                                          cfg.num_clients, cfg.seed, cfg.alpha))
        self.sizes = np.array([len(p) for p in self.parts])
        self.layout = layout or model_layout.layout(cfg.hidden)
        self.n = n = self.layout.n_params
        self.ctx = self._split_groups()
        self.rep = self._local_replica()
        self.global_w = self.rep.host_params().copy()    # identical on every rank (seeded)
        self.init_norm = float(np.linalg.norm(self.global_w))
        self.server_ratio = 0.0          # the last server step's length / the clients' (bcast)
        self.diverged_rounds = 0         # consecutive rounds in which every update was non-finite
        self.malicious, self.flipped = self._attackers()
        self.scaffold = Scaffold(self.ctx, backend, cfg.local_lr, cfg.scaffold_max_age) if cfg.scaffold else None
        if self.scaffold is not None:
            self.rep.post_reduce.append(self.scaffold.correction)
        self.server = server_opt.create(cfg, n) if comm.rank == 0 else None
        self.anchor = backend.to_device(self.global_w) if cfg.mu > 0 else None
        if self.anchor is not None:
            self.rep.post_reduce.append(FedProx(backend, cfg.mu, self.anchor))
        self.collector = collectors.create(self.ctx, cfg, plan, hooks)
        self.notice = StopNotice(comm)   # last: it posts a receive that must be withdrawn on any error
        self.stop: str | None = None
        self.best, self.start_round, self.last_round, self.any_round = 0.0, 0, 0, False
        self.reporter: Reporter | None = None

    def _split_groups(self) -> FedContext:
        """The client groups (Comm.Split) and what the server-side parts see of them."""
        cfg, comm = self.cfg, self.comm
        R = cfg.ranks_per_client
        n_groups, group = comm.size // R, comm.rank // R
        self.client_comm = comm.Split(group, comm.rank)       # the R ranks that train one client
        leader = self.client_comm.rank == 0
        self.leaders = comm.Split(0 if leader else 1, comm.rank)   # world rank 0 is their rank 0
        # under secure aggregation a client always trains on the same group, whose leader holds
        # its identity key; SCAFFOLD keeps c_i there (LPT over all clients by size, once)
        home = partition.assign_to_groups(np.arange(cfg.num_clients), self.sizes, n_groups) \
            if cfg.secure_agg or cfg.scaffold else None
        return FedContext(comm=comm, leaders=self.leaders, leader=leader, group=group, n_groups=n_groups,
                          n=self.n, sizes=self.sizes, home=home)

    def _local_replica(self) -> Replica:
        """Local training is plain SGD, as in the paper (server momentum is --server-opt fedavgm);
        a batch larger than every client never fills: the buffers fit the largest client."""
        cfg = self.cfg
        local_cfg = cfg.replace(optimizer="sgd", momentum=0.0, weight_decay=0.0)
        reducer = gradient_reducer(cfg, self.client_comm, world=self.comm, group=self.ctx.group)
        return Replica(local_cfg, self.backend, max_local_batch=max_local_batch(cfg, self.sizes),
                       reducer=reducer, layout=self.layout, norm=(self.data.mean, self.data.std))

    def _attackers(self) -> tuple[set[int], Any]:
        """Simulated attackers (robustness experiments): a seeded set, fixed for the run, and the
        flipped labels of a label-flipping attack."""
        cfg = self.cfg
        if cfg.attack is None:
            return set(), None
        malicious = set(attacks.malicious_clients(cfg.num_clients, cfg.malicious_fraction, cfg.seed).tolist())
        flipped = None
        if cfg.attack == "labelflip":
            labels = self.backend.to_host(self.data.train_y)
            flipped = self.backend.to_device(attacks.flip_labels(labels, self.data.num_classes))
        return malicious, flipped

    def describe(self) -> str:
        c = self.cfg
        per_round = (f"{c.client_fraction:g} x {c.num_clients} per round (Poisson)" if self.plan else
                     f"{partition.per_round(c.num_clients, c.client_fraction)} per round")
        groups = self.ctx.n_groups
        return (f"fl: {self.comm.size} rank{'s' if self.comm.size > 1 else ''} in {groups} "
                f"client group{'s' if groups > 1 else ''} of {c.ranks_per_client}, "
                f"{c.num_clients} clients ({c.partition}), {per_round}, E={c.local_epochs} "
                f"B={c.local_batch_size} lr={c.local_lr}; {self.algorithm()}; "
                f"model {'-'.join(map(str, self.rep.layout.sizes))}")

    def algorithm(self) -> str:
        """What trains, as a comparison's logs must tell apart: the local rule, the server's
        optimizer and rule, the stragglers' normalisation, privacy and the simulated attacks."""
        c = self.cfg
        local = "SCAFFOLD" if c.scaffold else f"FedProx mu={c.mu:g}" if c.mu > 0 else "FedAvg"
        server = f"server {c.server_opt} lr={c.server_lr:.4g}"
        if c.server_opt == "fedavgm":
            server += f" momentum={c.server_momentum:g}"
        parts = [local, server]
        if c.aggregator != "mean":
            parts.append(f"aggregator {c.aggregator}")
        if c.straggler_rate > 0:
            parts.append(f"FedNova for {c.straggler_rate:g} stragglers")
        if c.secure_agg:
            parts.append("secure aggregation")
        if self.plan:
            parts.append(f"client-level DP clip {self.plan.clip:g} z {self.plan.z:.4g}"
                         + (" (each client's own ledger)" if self.plan.secure else ""))
        if c.attack:
            parts.append(f"attack {c.attack} by {c.malicious_fraction:g} of the clients")
        if c.server_attack:
            parts.append(f"simulated malicious server: {c.server_attack}")
        return ", ".join(parts)

    # ---- one round: sample -> train -> aggregate -> broadcast -> record
    def round(self, server_round: int) -> dict | None:
        """One round; returns its record, without accuracy, or None when a stop signal was
        agreed (the global model is then that of the round's start)."""
        t0 = time.perf_counter()
        watchdog.progress(f"fl round {server_round}")
        plan = self.sample(server_round)
        self.collector.begin(server_round, self.global_w, plan.sampled.tolist(), plan.dropped, plan.groups)
        if self.anchor is not None:
            self.anchor[...] = self.backend.to_device(self.global_w)
        self.hooks.at_step(self.comm.rank, server_round, self.rep.pre_reduce)   # in fl mode a step is a round
        if self._stop_agreed(self.train_clients(server_round, plan)):
            if self.scaffold is not None:
                self.scaffold.discard()
            return None
        result = self.broadcast(self.aggregate(server_round, len(plan.sampled)))
        self._report(server_round, result, len(plan.sampled))
        return self.record(server_round, plan, result, time.perf_counter() - t0)

    def sample(self, server_round: int) -> RoundPlan:
        """The round's clients: a fixed share C (McMahan et al. 2017), or under DP each client
        independently with probability C, from the secret noise seed (McMahan et al. 2018:
        the accounting's amplification by sampling needs a sample nobody can predict); who drops
        out and who straggles; which group trains whom (a client with a home always trains there:
        its identity key, its c_i)."""
        cfg = self.cfg
        if self.plan is not None:
            sampled = partition.poisson_clients(cfg.num_clients, cfg.client_fraction, server_round,
                                                self.plan.noise_seed, self.plan.attempt)
        else:
            sampled = partition.sample_clients(cfg.num_clients, cfg.client_fraction, server_round, cfg.seed)
        dropped = partition.dropouts(sampled, cfg.dropout_rate, server_round, cfg.seed)
        if self.ctx.home is not None:
            picked = set(sampled.tolist())
            groups = [[k for k in part if k in picked] for part in self.ctx.home]
        else:
            groups = partition.assign_to_groups(sampled, self.sizes, self.ctx.n_groups)
        stragglers = partition.stragglers([k for k in sampled if k not in dropped], cfg.straggler_rate,
                                          server_round, cfg.seed)
        return RoundPlan(sampled, dropped, groups, stragglers)

    def train_clients(self, server_round: int, plan: RoundPlan) -> bool:
        """Local training of this group's clients in turn; the leader adds each update to the
        collector. Returns True when the group agreed on a stop signal."""
        cfg, rep = self.cfg, self.rep
        for k in plan.groups[self.ctx.group]:
            if k in plan.dropped:             # it never reports: its training would be lost anyway
                continue
            rep.load_params(self.global_w)
            rep.reset_optimizer()
            if self.scaffold is not None:
                self.scaffold.start(k, server_round)
            cut = None
            if k in plan.stragglers:          # it finishes only this share of its local steps
                cut = max(1, math.ceil(plan.stragglers[k] * local_steps(cfg, int(self.sizes[k]))))
            flip = self.flipped if k in self.malicious and cfg.attack == "labelflip" else None
            local = client_update(rep, self.client_comm, self.data, cfg,
                                  ClientJob(server_round, k, self.parts[k], flip, cut), self.notice)
            if local.stopped:
                return True
            w_k = rep.host_params()
            dc = self.scaffold.finish(k, w_k, local.steps, server_round, self.global_w) \
                if self.scaffold is not None else None
            if self.ctx.leader:                   # one copy per client, not one per rank
                if k in self.malicious and cfg.attack in attacks.UPDATE_KINDS:
                    w_k = self.poisoned(k, w_k, server_round)
                self.collector.add(ClientUpdate(k, w_k, int(self.sizes[k]), local.loss_sum, local.seen,
                                                local.steps, dc))
        return False

    def _stop_agreed(self, stopped: bool) -> bool:
        """Does anyone stop? (one tiny Allreduce per round; a rank that got the signal while it
        had no client to train votes here)"""
        flags = np.array([stopped or preempt.requested() is not None, self.notice.sent], np.int64)
        self.comm.Allreduce_sum(flags)
        return bool(flags[0])

    def aggregate(self, server_round: int, clients: int) -> RoundResult:
        """The collector's result; on rank 0 the server optimizer's step with the average."""
        average, result = self.collector.finish(server_round, clients)
        if self.comm.rank == 0:
            assert self.server is not None
            if average is not None:
                before = self.global_w.copy()
                self.server.step(self.global_w, average)
                # how far the server moved against how far the clients did: about 1 for FedAvg,
                # up to 1/(1-momentum) for FedAvgM; far more means the server step is too large
                result.server_ratio = float(np.linalg.norm(self.global_w - before) /
                                            max(float(np.linalg.norm(before - average)), 1e-30))
            result.norm = float(np.linalg.norm(self.global_w))    # nan/inf when the update broke it
            # what a real server sends: the global model, to every sampled client
            result.bytes_from_server += 4 * self.n * clients
        return result

    def broadcast(self, result: RoundResult) -> RoundResult:
        """SCAFFOLD's c, the global model and the round's result to every rank."""
        summed, result.scaffold = result.scaffold, None
        if self.scaffold is not None:
            self.scaffold.server_update(summed if self.comm.rank == 0 else None)
        self.comm.Bcast(self.global_w)
        return self.comm.bcast(result)

    def _report(self, server_round: int, result: RoundResult, sampled: int) -> None:
        """Warnings (rejected updates, a skipped round) and the checks that stop every rank."""
        by_reason: dict[str, list] = {}
        for k, why in result.rejected:
            by_reason.setdefault(why, []).append(str(k))
        if self.plan is not None:                  # DP: neither which nor how many (the sample is secret)
            by_reason.clear()
        for why, ks in by_reason.items():          # once per round and reason, naming the clients
            if set(ks) == {"?"}:                   # secure aggregation: how many, never which
                who = f"{len(ks)} client{'s' if len(ks) > 1 else ''} (secure aggregation hides which) "
                who += "are" if len(ks) > 1 else "is"
            else:
                who = f"client {ks[0]} is" if len(ks) == 1 else f"{len(ks)} clients ({', '.join(ks)}) are"
            _warn(self.comm, f"round {server_round}: the update of {who} rejected: {why}")
        self._check(server_round, result, sampled)
        if result.server_ratio is not None:
            self.server_ratio = result.server_ratio
        if result.skipped and not self.cfg.server_attack:     # (the attack's own line says why)
            _warn(self.comm, f"round {server_round} skipped, the global model is unchanged: {result.skipped}")

    def _check(self, server_round: int, result: RoundResult, sampled: int) -> None:
        """Stop every rank (they all see the same result) with the option that matters. A client
        whose training diverged is only rejected; when most of a round's clients diverged three
        rounds in a row, training itself is diverging (under DP this reveals that, and nothing
        more: docs/privacy.md's "not private")."""
        cfg, norm = self.cfg, result.norm
        if result.error:
            raise TrainingError(f"round {server_round}: {result.error}", collective=True)
        server = f"try a smaller --server-lr (now {cfg.server_lr} with --server-opt {cfg.server_opt})"
        mostly = result.nonfinite > 0 and 2 * result.nonfinite > max(sampled, 1)
        self.diverged_rounds = self.diverged_rounds + 1 if mostly else 0
        if self.diverged_rounds >= DIVERGED_ROUNDS:
            if self.server_ratio > 20 or norm > 10 * self.init_norm:
                blame = (f"{server}: the last server step moved the model {self.server_ratio:.0f}x as far "
                         f"as the clients did")
            else:
                blame = f"try a smaller --local-lr (now {cfg.local_lr})"
                if self.plan is not None:
                    blame += f" or a smaller --dp-clip (now {cfg.dp_clip:g}) or --server-lr (now {cfg.server_lr:g})"
            raise TrainingError(f"the training loss of most clients became non-finite in rounds "
                                f"{server_round - DIVERGED_ROUNDS + 1}-{server_round}; {blame}", collective=True)
        if not math.isfinite(norm):
            raise TrainingError(f"the server update made the global model non-finite in round "
                                f"{server_round}; {server}", collective=True)

    def record(self, server_round: int, plan: RoundPlan, result: RoundResult, seconds: float) -> dict:
        """The round's metrics record (without accuracy); under DP the round is accounted here,
        and the record carries no count of the secret sample (clients, dropouts, rejections,
        samples, bytes: each would tell how many were drawn) and no training loss (only the
        noised model is released)."""
        rec: dict[str, Any] = {"mode": "fl", "round": server_round, "ranks": self.comm.size,
                               "skipped": result.skipped or None, "test_accuracy": None, "round_seconds": seconds}
        if self.plan is None:
            rec.update(clients=len(plan.sampled), dropped=len(plan.dropped), rejected=len(result.rejected),
                       stragglers=len(plan.stragglers), train_loss=result.train_loss,
                       samples_per_second=result.seen / seconds, bytes_to_server=int(result.bytes_to_server),
                       bytes_from_server=int(result.bytes_from_server))
            for key in ("gather_seconds", "aggregate_seconds", "aggregate_memory_bytes"):
                if getattr(result, key) is not None:
                    rec[key] = getattr(result, key)
        if self.cfg.secure_agg:
            rec["secagg_seconds"] = result.secagg_seconds
            rec["secagg_stages"] = result.secagg_stages
            if self.plan is None:
                rec["secagg_clipped"] = result.secagg_clipped
            if result.server_attack is not None:
                rec["server_attack"] = result.server_attack
        if result.budget_stop:
            rec["budget_stop"] = result.budget_stop
        if self.plan is not None:
            self._account(rec, result)
        return rec

    def _account(self, rec: dict, result: RoundResult) -> None:
        """Compose the round into the accountant and add its privacy fields to the record."""
        plan = self.plan
        assert plan is not None
        if plan.secure:             # the clients' own ledgers: the largest spend among them
            if result.dp_mu2 is not None:
                plan.accountant.update(result.dp_mu2)    # type: ignore[attr-defined]
        elif not result.budget_stop:    # central: every round releases (noise alone when nobody counts)
            plan.compose_round(plan.z, rec["round"])
        rec.update(dp_epsilon=plan.accountant.epsilon(), dp_noise=plan.z, dp_delta=self.cfg.dp_delta)

    def poisoned(self, k: int, w_k: np.ndarray, server_round: int) -> np.ndarray:
        """What malicious client k sends instead of its honest model (attacks.py)."""
        cfg = self.cfg
        assert cfg.attack is not None
        rng = np.random.default_rng([cfg.seed, server_round, k, 0xA7])
        delta = w_k.astype(np.float64) - self.global_w
        bad = attacks.poison_update(cfg.attack, delta, cfg.attack_scale, rng)
        return (self.global_w + bad).astype(np.float32)

    def evaluate(self) -> tuple[float, float]:
        """Global test accuracy and loss, each rank scoring its slice of the test set."""
        watchdog.progress("fl evaluation")
        self.rep.load_params(self.global_w)
        return self.rep.evaluate(self.comm, self.data.test_x, self.data.test_y)

    # ---- loop.Trainer
    def start(self, reporter: Reporter) -> Iterable[int]:
        self.reporter = reporter
        reporter.info(self.describe())
        self.start_round, self.best = self._resume(reporter)
        self.last_round = self.start_round
        return range(self.start_round + 1, self.cfg.rounds + 1)

    def _start_privacy(self, reporter: Reporter, changed: list[str]) -> None:
        """The privacy ledger, this attempt's noise keys and, on a lengthened resume, z (plan.py)."""
        if self.plan is None:
            return
        said = self.plan.start_attempt(self.comm, self.cfg.checkpoint_dir, changed, self.cfg.rounds - self.start_round)
        if said:
            reporter.warn(f"resuming under --dp-epsilon: {said}")

    def run_unit(self, unit: int) -> dict | None:
        rec = self.round(unit)
        if rec is None:
            self.stop = preempt.requested() or "SIGTERM/SIGUSR1 on another rank"
            return None
        if rec.get("budget_stop"):                 # withheld before unmasking: nothing released
            assert self.reporter is not None
            self.reporter.warn(f"training stops with the model of round {self.last_round}: {rec['budget_stop']}")
            return rec
        self.last_round = unit
        if unit % self.cfg.eval_every == 0 or unit == self.cfg.rounds:
            acc, test_loss = self.evaluate()
            self.best = max(self.best, acc)
            rec.update(test_accuracy=acc, test_loss=test_loss)
        return rec

    def line(self, rec: dict) -> str:
        acc_txt = f"test acc {100 * rec['test_accuracy']:6.2f}%" if rec["test_accuracy"] is not None else ""
        attack = attack_line(rec["server_attack"], private=self.plan is not None) if rec.get("server_attack") else ""
        if "dp_epsilon" in rec:                    # DP: no loss, no bytes (they tell the sample)
            return (f"round {rec['round']:4d}  {acc_txt}  {rec['round_seconds']:6.3f} s  "
                    f"eps {rec['dp_epsilon']:.3g}") + attack
        loss_txt = f"{rec['train_loss']:.4f}" if rec["train_loss"] is not None else "   n/a"
        return (f"round {rec['round']:4d}  loss {loss_txt}  {acc_txt}  {rec['round_seconds']:6.3f} s  "
                f"{rec['bytes_to_server'] / 1e6:.1f} MB to server") + attack

    def is_last(self, unit: int) -> bool:
        return unit >= self.cfg.rounds

    def save(self) -> Path | None:
        return self._save(self.last_round, self.best)

    def close(self, history: list[dict]) -> None:
        """The stop notices in flight are settled; a run in which no round completed fails."""
        senders = np.array([self.notice.sent], np.int64)
        self.comm.Allreduce_sum(senders)           # how many stop notices are in flight
        self.notice.close(int(senders[0]))
        self.any_round = bool(history)
        if self.stop is None and history and not self.cfg.server_attack and self.start_round == 0 \
                and all(r["skipped"] or r.get("budget_stop") for r in history):
            reasons = sorted({r["skipped"] or r["budget_stop"] for r in history})
            raise TrainingError(f"no round completed in {len(history)} round(s), so no model was trained "
                                f"and none is written: {'; '.join(reasons[:3])}"
                                f"{' (and more)' if len(reasons) > 3 else ''}", collective=True)

    def preempted(self) -> str | None:
        if self.stop is None:
            return None
        return f"during round {self.last_round + 1}, which a resumed run redoes from its start"

    def params(self) -> np.ndarray:
        return self.global_w

    def model_parts(self) -> tuple[tuple[int, ...], np.ndarray | None]:
        return tuple(self.rep.layout.sizes), None

    def final_checkpoint(self) -> Path | None:
        return self._save(self.last_round, self.best) if self.any_round else None

    def summary(self, history: list[dict], params: np.ndarray) -> loop.Summary:
        extra = {"rounds": len(history), **(self.plan.summary() if self.plan is not None else {})}
        return loop.Summary(history, params, loop.last_accuracy(history), best_accuracy=self.best, extra=extra)

    # ---- checkpoints
    def _save(self, server_round: int, best: float) -> Path | None:
        """Checkpoint at a round boundary: the global model and the server optimizer's state
        are all there is (client optimizers restart every round; partitions, client sampling
        and batch orders are pure functions of the seed and the round)."""
        if not self.cfg.checkpoint_dir:
            return None
        meta: dict = {"step": server_round, "round": server_round, "ranks": self.comm.size, "best_accuracy": best,
                      "data": self.data.fingerprint}
        if self.plan is not None:
            meta["dp"] = self.plan.state()
        extra = self.scaffold.gather() if self.scaffold is not None else None   # collective

        def arrays() -> dict:
            assert self.server is not None            # called on rank 0
            return {"params": self.global_w, **{f"server.{k}": v for k, v in self.server.state().items()},
                    **(extra or {})}

        return checkpoint.save_on_root(self.comm, self.cfg, meta, arrays)

    def _resume(self, reporter: Reporter) -> tuple[int, float]:
        """Load the newest checkpoint, if any: returns (last round done, best accuracy so far).
        Opens the metrics file (reporter.begin) once the run is known to go on."""
        ckpt = checkpoint.restore(self.comm, self.cfg, self.data.fingerprint or None)
        if ckpt is not None and ckpt.step > self.cfg.rounds:
            raise UsageError(f"--checkpoint-dir {self.cfg.checkpoint_dir}: {ckpt.path.name} is after "
                             f"round {ckpt.step}, past this run's --rounds {self.cfg.rounds}: raise "
                             "--rounds to go on, or use another folder", collective=True)
        changed = checkpoint.changed_for_release(ckpt, self.comm.size)
        done = 0
        if ckpt is not None:
            if self.plan is not None and "dp" in ckpt.meta:
                self.plan.load_state(ckpt.meta["dp"])     # the same secret noise seed
            done = int(ckpt.meta["round"])
        self.start_round = done
        self._start_privacy(reporter, changed)            # may refuse: before the metrics file opens
        reporter.begin(ckpt.step if ckpt else (0 if self.cfg.resume else None), key="round")
        warning = ckpt.warning() if ckpt is not None else None
        if warning:
            reporter.warn(warning)
        if ckpt is None:
            return 0, 0.0
        self.global_w[...] = ckpt.arrays["params"]
        if self.scaffold is not None:
            self.scaffold.restore(ckpt.arrays)
        if self.server is not None:
            self.server.load_state({k[7:]: v for k, v in ckpt.arrays.items() if k.startswith("server.")})
        reporter.info(f"resuming from {ckpt.path} after round {ckpt.meta['round']}")
        return done, float(ckpt.meta["best_accuracy"])

    def free(self) -> None:
        """The communicators and the reducer (the stop notice is closed before, collectively);
        once (an error path may come here again)."""
        if self.rep is None:
            return
        self.rep.free()
        self.client_comm.Free()
        self.leaders.Free()
        self.rep = None      # type: ignore[assignment]


def attack_line(got: dict, private: bool) -> str:
    """--server-attack: the round's outcome on a line of its own (under DP without client ids)."""
    target = "a client" if private or got.get("target") is None else f"client {got['target']}"
    colluders = got.get("colluders", 0)
    head = f"\n  attack {got['name']} on {target}"
    if colluders:
        head += f" with {colluders} colluding client{'s' if colluders > 1 else ''}"
    if got.get("detected"):
        seen = got.get("detected_by") or ""
        seen = seen.split(": ", 1)[-1] if private else seen
        head += f": detected ({seen})"
    else:
        head += ": not detected (the protocol allows what it did)"
    if got.get("learned_individual"):
        learned = "the target's update"
    elif got.get("learned_partial"):
        learned = f"a partial sum of {got.get('smallest_sum_learned')} inputs"
    else:
        learned = "nothing but an accepted survivor set's sum" if got.get("smallest_sum_learned") else "nothing"
    return f"{head}; learned: {learned}"


def _warn(comm: Comm, message: str) -> None:
    if comm.rank == 0:
        logger.warning(message)


def buffer_bytes(cfg: Config, layout: Layout, server: bool, groups: int = 1) -> int:
    """What a Federation allocates besides its Replica (for the memory check before a run): the
    global model, the float64 send (and, on the server, receive) buffer, the server optimizer's
    state, FedProx's anchor, SCAFFOLD's control variates (float64, every client of the group)
    and, for the robust rules, the server's stack of the round's updates (and its sort copy)."""
    n = layout.n_params
    per_round = partition.per_round(cfg.num_clients, cfg.client_fraction)
    server_state = server_opt.SERVER_OPTIMIZERS[cfg.server_opt].state_vectors * 4 * n
    total = 4 * n + 8 * (n + 5) * (2 if server else 1) + (server_state if server else 0) \
        + (8 * n if cfg.mu > 0 else 0)
    if cfg.scaffold:
        total += 8 * n * (math.ceil(cfg.num_clients / groups) + 2) + (16 * n if server else 0)
    if server and aggregators.AGGREGATORS[cfg.aggregator].gathered:
        total += 3 * 4 * n * per_round      # the gathered bytes, the stack, median's sorted copy
    if cfg.secure_agg:
        total += 2 * 4 * (n + 5) * per_round * (2 if server else 1)   # inputs, masks; uploads on the server
    return total


def max_local_batch(cfg: Config, sizes: np.ndarray) -> int:
    """Rows one rank of a group computes at most per local step: a batch never exceeds the
    client's data (full batch), so huge --local-batch-size values cost no memory."""
    return math.ceil(min(cfg.local_batch_size, int(sizes.max())) / cfg.ranks_per_client)


def train(cfg: Config, comm: Comm, data: Dataset, backend: Backend, reporter: Reporter,
          layout: Layout | None = None, plan: DpPlan | None = None, hooks: Hooks | None = None) -> loop.Summary:
    """Run federated training on every rank of comm (loop.run); returns the summary.

    With --checkpoint-dir, rank 0 checkpoints every --checkpoint-every rounds, at the end, and
    when a stop signal arrives; then every rank raises Preempted. --resume goes on after the
    saved round: bitwise the uninterrupted run on as many ranks.
    """
    fed = Federation(cfg, comm, data, backend, layout, plan, hooks or testing.current())
    try:
        return loop.run(fed, cfg, comm, reporter)
    except BaseException:
        fed.notice.abandon()          # (a no-op once closed)
        raise
    finally:
        fed.free()
