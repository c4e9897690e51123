"""Federated training (FedAvg and friends) over MPI.

Ranks form client groups of --ranks-per-client R (Comm.Split); inside a group, a client trains
data parallel exactly as in dp mode. Each round (McMahan et al. 2017, Algorithm 1):
  1. every rank draws the same sample of clients (seeded by the round, no communication),
  2. each group trains its share of the sampled clients in turn, for --local-epochs E from the
     global model (plain SGD, batch --local-batch-size B, optional FedProx term),
  3. group leaders Reduce sum_k n_k w_k (and the counts) to rank 0, the server,
  4. the server averages and applies its optimizer, then Bcasts the new global model,
  5. every rank scores its slice of the test set with the global model.
A stop signal (preemption) is agreed within one local step: the group's step Allreduce carries
the votes, comm.StopNotice tells the other groups; the round is then abandoned and the run
checkpoints the state at its start, so a resumed run redoes it bitwise.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .. import log
from ..fl import server_opt as aggregate
from ..fl import attacks
from ..io import checkpoint
from ..fl import collectors as collect
from ..runtime import faults
from ..fl import partition
from ..runtime import preempt
from ..runtime import watchdog
from ..parallel.comm import StopNotice
from ..training.dataparallel import finish, gradient_reducer
from ..errors import Preempted, TrainingError, UsageError
from ..core.replica import FedProx, Replica
from ..fl.scaffold import Scaffold


def client_update(rep: Replica, comm, data, idx: np.ndarray, cfg, server_round: int, client: int,
                  notice=None, labels=None, max_steps: int | None = None) -> tuple[float, int, bool, int]:
    """Local training of one client from the weights in rep; returns (summed loss, samples
    seen, stopped, local steps): stopped when the group agreed on a stop signal (then it ends
    at once). `labels` replaces the training labels (a label-flipping attacker); `max_steps`
    cuts the training short (a straggler).

    The batch order is seeded by (seed, round, client, local epoch); the last batch of an
    epoch may be smaller (clients of a non-IID split can hold fewer samples than a batch, and
    a batch larger than the client is the whole client: full-batch gradient descent).
    """
    B, loss_sum, seen, steps = cfg.local_batch_size, 0.0, 0, 0
    labels = data.train_y if labels is None else labels
    for e in range(cfg.local_epochs):
        order = idx[np.random.default_rng([cfg.seed, server_round, client, e]).permutation(len(idx))]
        order = rep.backend.to_device(order)          # on a GPU: one upload per local epoch
        for start in range(0, len(order), B):
            if max_steps is not None and steps >= max_steps:
                return loss_sum, seen, False, steps
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
                return loss_sum, seen, True, steps
            if not math.isfinite(loss):
                # Only this client's ranks know: its update is rejected at the server (the
                # NaN loss travels with it), and the round goes on without it.
                return loss_sum, seen, False, steps
    return loss_sum, seen, False, steps


def local_steps(cfg, size: int) -> int:
    """Local SGD steps of a client of `size` samples in one round."""
    return cfg.local_epochs * math.ceil(size / cfg.local_batch_size)


class Federation:
    """The state of a federated run on this rank: its client group, the partition, a model
    replica for local training, the global model (on every rank), the server (rank 0), how the
    server collects the clients' contributions (collect.py) and the privacy accountant."""

    def __init__(self, cfg, comm, data, backend, layout=None, dp=None):
        self.cfg, self.comm, self.data, self.backend = cfg, comm, data, backend
        R = cfg.ranks_per_client
        self.n_groups, self.group = comm.size // R, comm.rank // R
        try:
            self.parts = partition.make(cfg.partition, backend.to_host(data.train_y), cfg.num_clients,
                                        cfg.seed, cfg.alpha)
        except UsageError as exc:                                 # computed alike on every rank
            exc.collective = True
            raise
        self.sizes = np.array([len(p) for p in self.parts])
        self.client_comm = comm.Split(self.group, comm.rank)     # the R ranks that train one client
        self.leader = self.client_comm.rank == 0
        self.leaders = comm.Split(0 if self.leader else 1, comm.rank)   # world rank 0 is their rank 0
        # local training is plain SGD, as in the paper; server momentum is --server-opt fedavgm
        local_cfg = cfg.replace(optimizer="sgd", momentum=0.0, weight_decay=0.0)
        reducer = gradient_reducer(cfg, self.client_comm, world=comm, group=self.group)
        # a batch larger than every client never fills: size the buffers for the largest client
        self.rep = Replica(local_cfg, backend, max_local_batch=max_local_batch(cfg, self.sizes),
                           reducer=reducer, layout=layout, norm=(data.mean, data.std))
        self.n = n = self.rep.layout.n_params
        self.global_w = backend.to_host(self.rep.params).copy()  # identical on every rank (seeded)
        self.init_norm = float(np.linalg.norm(self.global_w))
        self.server_ratio = 0.0          # the last server step's length / the clients' (bcast)
        self.diverged_rounds = 0         # consecutive rounds in which every update was non-finite
        # simulated attackers (robustness experiments): a seeded set, fixed for the run
        self.malicious = set()
        self.flipped = None
        if cfg.attack is not None:
            self.malicious = set(attacks.malicious_clients(cfg.num_clients, cfg.malicious_fraction, cfg.seed).tolist())
            if cfg.attack == "labelflip":
                self.flipped = backend.to_device(attacks.flip_labels(backend.to_host(data.train_y), data.num_classes))
        self.scaffold = Scaffold(self, backend) if cfg.scaffold else None
        self.server = aggregate.make(cfg, n) if comm.rank == 0 else None
        self.anchor = backend.to_device(self.global_w) if cfg.mu > 0 else None
        if self.anchor is not None:
            self.rep.post_reduce.append(FedProx(backend, cfg.mu, self.anchor))
        self.dp = dp                     # privacy.DpPlan (z, noise seed, accountant) or None
        # under secure aggregation a client always trains on the same group, whose leader holds
        # its identity key (LPT over all clients by size, once)
        self.home = partition.assign_to_groups(np.arange(cfg.num_clients), self.sizes, self.n_groups) \
            if cfg.secure_agg else None
        if cfg.secure_agg:
            collect.check_secure(cfg, dp.expected if dp else partition.per_round(cfg.num_clients,
                                                                               cfg.client_fraction))
        self.collector = collect.make(self, cfg, dp)
        self.notice = StopNotice(comm)   # last: it posts a receive that must be withdrawn on any error

    def describe(self) -> str:
        c = self.cfg
        per_round = (f"{c.client_fraction:g} x {c.num_clients} per round (Poisson)" if self.dp else
                     f"{partition.per_round(c.num_clients, c.client_fraction)} per round")
        extra = "".join([", secure aggregation" if c.secure_agg else "",
                         f", DP clip {self.dp.clip:g} z {self.dp.z:.4g}" if self.dp else ""])
        return (f"fl: {self.comm.size} rank{'s' if self.comm.size > 1 else ''} in {self.n_groups} "
                f"client group{'s' if self.n_groups > 1 else ''} of {c.ranks_per_client}, "
                f"{c.num_clients} clients ({c.partition}), {per_round}, E={c.local_epochs} "
                f"B={c.local_batch_size} lr={c.local_lr}, server {c.server_opt} lr={c.server_lr}{extra}, "
                f"model {'-'.join(map(str, self.rep.layout.sizes))}")

    def sample(self, server_round: int) -> np.ndarray:
        """The round's clients: a fixed share C (McMahan et al. 2017), or under DP each client
        independently with probability C, from the secret noise seed (McMahan et al. 2018:
        the accounting's amplification by sampling needs a sample nobody can predict)."""
        cfg = self.cfg
        if self.dp is not None:
            return partition.poisson_clients(cfg.num_clients, cfg.client_fraction, server_round,
                                             self.dp.noise_seed)
        return partition.sample_clients(cfg.num_clients, cfg.client_fraction, server_round, cfg.seed)

    def round(self, server_round: int) -> dict | None:
        """One round (module docstring, steps 1-4); returns its record, without accuracy, or
        None when a stop signal was agreed (the global model is then that of the round's start)."""
        cfg, comm, be, t0 = self.cfg, self.comm, self.backend, time.perf_counter()
        watchdog.progress(f"fl round {server_round}")
        sampled = self.sample(server_round)
        dropped = partition.dropouts(sampled, cfg.dropout_rate, server_round, cfg.seed)
        if self.scaffold is not None or self.home is not None:   # a client always trains at home:
            owned = self.scaffold.owned if self.scaffold is not None else self.home   # its c_i, its key
            picked = set(sampled.tolist())
            groups = [[k for k in part if k in picked] for part in owned]
        else:
            groups = partition.assign_to_groups(sampled, self.sizes, self.n_groups)
        self.owners_by_leader = groups                         # leaders' rank g = client group g
        self.collector.begin(server_round, sampled, dropped)
        if self.anchor is not None:
            self.anchor[...] = be.to_device(self.global_w)
        if faults.at_step(comm.rank, server_round):           # tests only; in fl mode STEP is the round
            self.rep.pre_reduce.append(faults.poison_loss_once(self.rep.pre_reduce))
        stragglers = partition.stragglers([k for k in sampled if k not in dropped], cfg.straggler_rate,
                                          server_round, cfg.seed)
        stopped = False
        for k in groups[self.group]:
            if k in dropped:                  # it never reports: its training would be lost anyway
                continue
            self.rep.load_params(self.global_w)
            self.rep.reset_optimizer()
            if self.scaffold is not None:
                self.scaffold.start(k, server_round)
            cut = None
            if k in stragglers:               # it finishes only this share of its local steps
                cut = max(1, math.ceil(stragglers[k] * local_steps(cfg, int(self.sizes[k]))))
            flip = self.flipped if k in self.malicious and cfg.attack == "labelflip" else None
            loss_sum, seen, stopped, steps = client_update(self.rep, self.client_comm, self.data, self.parts[k],
                                                           cfg, server_round, k, self.notice, flip, cut)
            if stopped:
                break
            w_k = be.to_host(self.rep.params)
            dc = self.scaffold.finish(k, w_k, steps, server_round) if self.scaffold is not None else None
            if self.leader:                                    # one copy per client, not one per rank
                if k in self.malicious and cfg.attack in attacks.UPDATE_KINDS:
                    w_k = self.poisoned(k, w_k, server_round)
                self.collector.add(k, w_k, int(self.sizes[k]), loss_sum, seen, steps, dc)
        # Does anyone stop? (one tiny Allreduce per round; a rank that got the signal while it
        # had no client to train votes here)
        flags = np.array([stopped or preempt.requested() is not None, self.notice.sent], np.int64)
        comm.Allreduce_sum(flags)
        if flags[0]:
            if self.scaffold is not None:
                self.scaffold.discard()
            return None
        average, stats = self.collector.finish(server_round, self.global_w, len(sampled))
        if comm.rank == 0:
            if average is not None:
                before = self.global_w.copy()
                self.server.step(self.global_w, average)
                # how far the server moved against how far the clients did: about 1 for FedAvg,
                # up to 1/(1-momentum) for FedAvgM; far more means the server step is too large
                stats["server_ratio"] = float(np.linalg.norm(self.global_w - before) /
                                              max(float(np.linalg.norm(before - average)), 1e-30))
            stats["norm"] = float(np.linalg.norm(self.global_w))    # nan/inf when the update broke it
            # what a real server sends: the global model, to every sampled client
            stats["bytes_from_server"] = stats.get("bytes_from_server", 0) + 4 * self.n * len(sampled)
        if self.scaffold is not None:
            self.scaffold.server_update(stats.pop("scaffold", None) if comm.rank == 0 else None)
        comm.Bcast(self.global_w)
        stats = comm.bcast(stats)
        by_reason: dict[str, list] = {}
        for k, why in stats.get("rejected", []):
            # under DP which clients were sampled is secret (the amplification by sampling needs it)
            by_reason.setdefault(why, []).append("?" if self.dp is not None else str(k))
        for why, ks in by_reason.items():          # once per round and reason, naming the clients
            if set(ks) == {"?"}:                   # secure aggregation or DP: how many, never which
                hides = "secure aggregation" if cfg.secure_agg else "differential privacy"
                who = f"{len(ks)} client{'s' if len(ks) > 1 else ''} ({hides} hides which) "
                who += "are" if len(ks) > 1 else "is"
            else:
                who = f"client {ks[0]} is" if len(ks) == 1 else f"{len(ks)} clients ({', '.join(ks)}) are"
            reporter_warn(comm, f"round {server_round}: the update of {who} rejected: {why}")
        self._check(server_round, stats)
        self.server_ratio = stats.get("server_ratio", self.server_ratio)
        if stats.get("skipped"):
            reporter_warn(comm, f"round {server_round} skipped, the global model is unchanged: {stats['skipped']}")
        seconds = time.perf_counter() - t0
        rec = {"mode": "fl", "round": server_round, "ranks": comm.size, "clients": len(sampled),
               "dropped": len(dropped), "rejected": len(stats.get("rejected", [])),
               "stragglers": len(stragglers), "skipped": stats.get("skipped") or None,
               "train_loss": stats["loss_sum"] / stats["seen"] if stats["seen"] else None,
               "test_accuracy": None, "round_seconds": seconds,
               "samples_per_second": stats["seen"] / seconds,
               "bytes_to_server": int(stats.get("bytes_to_server", 0)),
               "bytes_from_server": int(stats["bytes_from_server"])}
        for key in ("gather_seconds", "aggregate_seconds", "aggregate_memory_bytes"):
            if key in stats:
                rec[key] = stats[key]
        if cfg.secure_agg:
            rec["secagg_seconds"] = stats.get("secagg_seconds", 0.0)
            rec["secagg_stages"] = stats.get("secagg_stages", {})
            if self.dp is None:
                rec["secagg_clipped"] = stats.get("secagg_clipped", 0)
            if "server_attack" in stats:
                rec["server_attack"] = stats["server_attack"]
        if stats.get("budget_stop"):
            rec["budget_stop"] = stats["budget_stop"]
        if self.dp is not None:
            if self.dp.secure:             # only a released sum costs privacy
                z = stats.get("dp_noise")
                if z is not None:
                    self.dp.compose_round(z)
                    rec["dp_honest_shares"] = stats["dp_honest_shares"]
            else:                          # central: every planned round counts, skipped or not
                z = self.dp.z
                if not stats.get("budget_stop"):
                    self.dp.compose_round(z)
            rec.update(dp_epsilon=self.dp.accountant.epsilon(), dp_noise=z, dp_delta=cfg.dp_delta,
                       dp_clipped=stats.get("clipped"))
        return rec

    def _check(self, server_round: int, stats: dict) -> None:
        """Stop every rank (they all see the same stats) with the option that matters. A client
        whose training diverged is only rejected; when every update of 3 rounds in a row was
        rejected as non-finite, training itself is diverging."""
        cfg, norm = self.cfg, stats["norm"]
        if stats.get("error"):
            raise TrainingError(f"round {server_round}: {stats['error']}", collective=True)
        server = f"try a smaller --server-lr (now {cfg.server_lr} with --server-opt {cfg.server_opt})"
        all_diverged = (stats.get("skipped") is not None
                        and 0 < stats.get("nonfinite", 0) == len(stats.get("rejected", [])))
        self.diverged_rounds = self.diverged_rounds + 1 if all_diverged else 0
        if self.diverged_rounds >= 3:
            if self.server_ratio > 20 or norm > 10 * self.init_norm:
                blame = (f"{server}: the last server step moved the model {self.server_ratio:.0f}x as far "
                         f"as the clients did")
            else:
                blame = f"try a smaller --local-lr (now {cfg.local_lr})"
            raise TrainingError(f"every client's training loss became non-finite in rounds "
                                f"{server_round - 2}-{server_round}; {blame}", collective=True)
        if not math.isfinite(norm):
            raise TrainingError(f"the server update made the global model non-finite in round "
                                f"{server_round}; {server}", collective=True)

    def poisoned(self, k: int, w_k: np.ndarray, server_round: int) -> np.ndarray:
        """What malicious client k sends instead of its honest model (attacks.py)."""
        rng = np.random.default_rng([self.cfg.seed, server_round, k, 0xA7])
        delta = w_k.astype(np.float64) - self.global_w
        bad = attacks.poison_update(self.cfg.attack, delta, self.cfg.attack_scale, rng)
        return (self.global_w + bad).astype(np.float32)

    def evaluate(self) -> tuple[float, float]:
        """Global test accuracy and loss, each rank scoring its slice of the test set."""
        watchdog.progress("fl evaluation")
        self.rep.load_params(self.global_w)
        return self.rep.evaluate(self.comm, self.data.test_x, self.data.test_y)

    def save(self, server_round: int, best: float):
        """Checkpoint at a round boundary: the global model and the server optimizer's state
        are all there is (client optimizers restart every round; partitions, client sampling
        and batch orders are pure functions of the seed and the round)."""
        if not self.cfg.checkpoint_dir:
            return None
        meta = {"step": server_round, "round": server_round, "ranks": self.comm.size, "best_accuracy": best,
                "data": self.data.fingerprint}
        if self.dp is not None:
            meta["dp"] = self.dp.state()
        extra = self.scaffold.gather() if self.scaffold is not None else None   # collective
        return checkpoint.save_on_root(self.comm, self.cfg, meta, lambda: {
            "params": self.global_w, **{f"server.{k}": v for k, v in self.server.state().items()},
            **(extra or {})})

    def resume(self, reporter) -> tuple[int, float]:
        """Load the newest checkpoint, if any: returns (last round done, best accuracy so far).
        Opens the metrics file (reporter.begin) once the run is known to go on."""
        ckpt = checkpoint.restore(self.comm, self.cfg, self.data.fingerprint or None)
        if ckpt is not None and ckpt.step > self.cfg.rounds:
            raise UsageError(f"--checkpoint-dir {self.cfg.checkpoint_dir}: {ckpt.path.name} is after "
                             f"round {ckpt.step}, past this run's --rounds {self.cfg.rounds}: raise "
                             "--rounds to go on, or use another folder", collective=True)
        reporter.begin(ckpt.step if ckpt else (0 if self.cfg.resume else None), key="round")
        if ckpt is not None and ckpt.warning():
            reporter.warn(ckpt.warning())
        if ckpt is None:
            return 0, 0.0
        self.global_w[...] = ckpt.arrays["params"]
        if self.dp is not None and "dp" in ckpt.meta:
            self.dp.load_state(ckpt.meta["dp"])     # the same secret noise seed, the budget spent
        if self.scaffold is not None:
            self.scaffold.restore(ckpt.arrays)
        if self.server is not None:
            self.server.load_state({k[7:]: v for k, v in ckpt.arrays.items() if k.startswith("server.")})
        reporter.info(f"resuming from {ckpt.path} after round {ckpt.meta['round']}")
        return int(ckpt.meta["round"]), float(ckpt.meta["best_accuracy"])

    def free(self) -> None:
        """The communicators and the reducer (the stop notice is closed before, collectively);
        once (an error path may come here again)."""
        if self.rep is None:
            return
        self.rep.free()
        self.client_comm.Free()
        self.leaders.Free()
        self.rep = None


def reporter_warn(comm, message: str) -> None:
    if comm.rank == 0:
        log.warning(message)


def buffer_bytes(cfg, layout, server: bool, groups: int = 1) -> int:
    """What a Federation allocates besides its Replica (for the memory check before a run): the
    global model, the float64 send (and, on the server, receive) buffer, the server optimizer's
    state, FedProx's anchor, SCAFFOLD's control variates (float64, every client of the group)
    and, for the robust rules, the server's stack of the round's updates (and its sort copy)."""
    n = layout.n_params
    per_round = partition.per_round(cfg.num_clients, cfg.client_fraction)
    server_state = {"fedavg": 0, "fedavgm": 1, "fedadam": 2}[cfg.server_opt] * 4 * n
    total = 4 * n + 8 * (n + 5) * (2 if server else 1) + (server_state if server else 0) \
        + (8 * n if cfg.mu > 0 else 0)
    if cfg.scaffold:
        total += 8 * n * (math.ceil(cfg.num_clients / groups) + 2) + (16 * n if server else 0)
    if server and cfg.aggregator in ("median", "trimmed-mean", "krum", "multi-krum"):
        total += 3 * 4 * n * per_round      # the gathered bytes, the stack, median's sorted copy
    if cfg.secure_agg:
        total += 2 * 4 * (n + 5) * per_round * (2 if server else 1)   # inputs, masks; uploads on the server
    return total


def max_local_batch(cfg, sizes) -> int:
    """Rows one rank of a group computes at most per local step: a batch never exceeds the
    client's data (full batch), so huge --local-batch-size values cost no memory."""
    return math.ceil(min(cfg.local_batch_size, int(sizes.max())) / cfg.ranks_per_client)


def train(cfg, comm, data, backend, reporter, layout=None, dp=None) -> dict:
    """Run federated training; returns a summary (final and best accuracy, history).

    With --checkpoint-dir, rank 0 checkpoints every --checkpoint-every rounds, at the end, and
    when a stop signal arrives; then every rank raises Preempted. --resume goes on after the
    saved round: bitwise the uninterrupted run on as many ranks.
    """
    fed = Federation(cfg, comm, data, backend, layout, dp)
    try:
        return _run(cfg, comm, reporter, fed)
    except BaseException:
        fed.notice.abandon()          # (a no-op once closed)
        fed.free()
        raise


def _run(cfg, comm, reporter, fed) -> dict:
    reporter.info(fed.describe())
    done, best = fed.resume(reporter)
    history, stop, last_round = [], None, done
    for server_round in range(done + 1, cfg.rounds + 1):
        rec = fed.round(server_round)
        if rec is None:
            stop = preempt.requested() or "SIGTERM/SIGUSR1 on another rank"
            break
        if rec.get("budget_stop"):                 # withheld before unmasking: nothing released
            reporter.warn(f"training stops with the model of round {last_round}: {rec['budget_stop']}")
            history.append(rec)
            break
        last_round = server_round
        if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
            acc, test_loss = fed.evaluate()
            best = max(best, acc)
            rec.update(test_accuracy=acc, test_loss=test_loss)
        history.append(rec)
        acc_txt = f"test acc {100 * rec['test_accuracy']:6.2f}%" if rec["test_accuracy"] is not None else ""
        loss_txt = f"{rec['train_loss']:.4f}" if rec["train_loss"] is not None else "   n/a"
        eps_txt = f"  eps {rec['dp_epsilon']:.3g}" if "dp_epsilon" in rec else ""
        asked = reporter.record(rec, f"round {server_round:4d}  loss {loss_txt}  {acc_txt}  "
                                     f"{rec['round_seconds']:6.3f} s  {rec['bytes_to_server'] / 1e6:.1f} MB to server"
                                     f"{eps_txt}")
        if comm.bcast(asked):                  # a callback on rank 0 said StopTraining
            break
        if cfg.target_accuracy is not None and best >= cfg.target_accuracy:
            reporter.info(f"reached the target accuracy {100 * cfg.target_accuracy:.2f}% in round {server_round}")
            break
        if cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0 and server_round < cfg.rounds:
            fed.save(server_round, best)
    senders = np.array([fed.notice.sent], np.int64)
    comm.Allreduce_sum(senders)                # how many stop notices are in flight
    fed.notice.close(int(senders[0]))
    try:
        if stop is None and history and not cfg.server_attack and all(r["skipped"] or r.get("budget_stop")
                                                                     for r in history) and done == 0:
            reasons = sorted({r["skipped"] or r["budget_stop"] for r in history})
            raise TrainingError(f"no round completed in {len(history)} round(s), so no model was trained "
                                f"and none is written: {'; '.join(reasons[:3])}"
                                f"{' (and more)' if len(reasons) > 3 else ''}", collective=True)
        if stop is not None:
            path = fed.save(last_round, best)
            kept = f"saved {path}; run again with --resume to continue" if path else \
                "progress is lost (no --checkpoint-dir)"
            raise Preempted(f"stopped by {stop} during round {last_round + 1}, which a resumed run "
                            f"redoes from its start: {kept}", collective=True)
        finish(reporter, fed.global_w, fed.rep.layout.sizes,
               lambda: fed.save(last_round, best) if history else None)
    finally:
        fed.free()
    last = next((r["test_accuracy"] for r in reversed(history) if r["test_accuracy"] is not None), None)
    out = {"history": history, "test_accuracy": last, "best_accuracy": best, "params": fed.global_w,
           "rounds": len(history)}
    if fed.dp is not None:
        out.update(dp_epsilon=fed.dp.accountant.epsilon(), dp_noise=fed.dp.z, dp_delta=fed.dp.delta)
    return out
