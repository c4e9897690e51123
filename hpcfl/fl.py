"""Federated training (FedAvg and friends) over MPI.

Ranks form client groups of --ranks-per-client R (Comm.Split); inside a group, a client trains
data parallel exactly as in dp mode. Each round (McMahan et al. 2017, Algorithm 1):
  1. every rank draws the same sample of clients (seeded by the round, no communication),
  2. each group trains its share of the sampled clients in turn, for --local-epochs E from the
     global model (plain SGD, batch --local-batch-size B, optional FedProx term),
  3. group leaders Reduce sum_k n_k w_k (and the counts) to rank 0, the server,
  4. the server averages and applies its optimizer, then Bcasts the new global model,
  5. every rank scores its slice of the test set with the global model.
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import aggregate, checkpoint, faults, partition, preempt
from .dp import Replica, gradient_reducer
from .errors import Preempted, TrainingError, UsageError


def client_update(rep: Replica, comm, data, idx: np.ndarray, cfg, server_round: int, client: int,
                  fault: bool = False) -> tuple[float, int]:
    """Local training of one client from the weights in rep; returns (summed loss, samples seen).

    The batch order is seeded by (seed, round, client, local epoch); the last batch of an
    epoch may be smaller (clients of a non-IID split can hold fewer samples than a batch).
    """
    B, loss_sum, seen = cfg.local_batch_size, 0.0, 0
    for e in range(cfg.local_epochs):
        order = idx[np.random.default_rng([cfg.seed, server_round, client, e]).permutation(len(idx))]
        order = rep.backend.to_device(order)          # on a GPU: one upload per local epoch
        for start in range(0, len(order), B):
            batch = order[start:start + B]
            loss = rep.step(comm, data.train_x, data.train_y, batch, cfg.local_lr, fault)
            fault = False
            loss_sum += loss * len(batch)
            seen += len(batch)
            if not math.isfinite(loss):
                # Only this client's ranks know: stop here and let the NaN travel in the round's
                # reduced statistics, so that every rank stops together after the Bcast.
                return loss_sum, seen
    return loss_sum, seen


class Federation:
    """The state of a federated run on this rank: its client group, the partition, a model
    replica for local training, the global model (on every rank) and the server (rank 0)."""

    def __init__(self, cfg, comm, data, backend):
        self.cfg, self.comm, self.data, self.backend = cfg, comm, data, backend
        R = cfg.ranks_per_client
        self.n_groups, self.group = comm.size // R, comm.rank // R
        self.client_comm = comm.Split(self.group, comm.rank)     # the R ranks that train one client
        self.leader = self.client_comm.rank == 0
        self.leaders = comm.Split(0 if self.leader else 1, comm.rank)   # world rank 0 is their rank 0
        try:
            self.parts = partition.make(cfg.partition, backend.to_host(data.train_y), cfg.num_clients,
                                        cfg.seed, cfg.alpha)
        except UsageError as exc:                                 # computed alike on every rank
            exc.collective = True
            raise
        self.sizes = np.array([len(p) for p in self.parts])
        # local training is plain SGD, as in the paper; server momentum is --server-opt fedavgm
        local_cfg = cfg.replace(optimizer="sgd", momentum=0.0, weight_decay=0.0)
        self.reducer = gradient_reducer(cfg, self.client_comm)   # NCCL inside a client, if asked
        self.rep = Replica(local_cfg, backend, max_local_batch=math.ceil(cfg.local_batch_size / R),
                           reducer=self.reducer)
        self.n = n = self.rep.layout.n_params
        self.global_w = backend.to_host(self.rep.params).copy()  # identical on every rank (seeded)
        self.server = aggregate.make(cfg, n) if comm.rank == 0 else None
        # [sum_k n_k w_k | sum_k n_k | loss sum | samples seen]; float64 so big sums stay exact
        self.sendbuf = np.zeros(n + 3, np.float64)
        self.recvbuf = np.zeros(n + 3, np.float64) if comm.rank == 0 else None
        self.anchor = backend.to_device(self.global_w) if cfg.mu > 0 else None
        if self.anchor is not None:
            self.rep.proximal = (cfg.mu, self.anchor)

    def describe(self) -> str:
        c = self.cfg
        per_round = max(1, int(round(c.client_fraction * c.num_clients)))
        return (f"fl: {self.comm.size} ranks in {self.n_groups} client groups of {c.ranks_per_client}, "
                f"{c.num_clients} clients ({c.partition}), {per_round} per round, E={c.local_epochs} "
                f"B={c.local_batch_size} lr={c.local_lr}, server {c.server_opt} lr={c.server_lr}, "
                f"model {'-'.join(map(str, self.rep.layout.sizes))}")

    def round(self, server_round: int) -> dict:
        """One round (module docstring, steps 1-4); returns its record, without accuracy."""
        cfg, comm, be, n, t0 = self.cfg, self.comm, self.backend, self.n, time.perf_counter()
        sampled = partition.sample_clients(cfg.num_clients, cfg.client_fraction, server_round, cfg.seed)
        mine = partition.assign_to_groups(sampled, self.sizes, self.n_groups)[self.group]
        self.sendbuf[...] = 0
        if self.anchor is not None:
            self.anchor[...] = be.to_device(self.global_w)
        fault = faults.at_step(comm.rank, server_round)       # tests only; in fl mode STEP is the round
        for k in mine:
            self.rep.load_params(self.global_w)
            self.rep.reset_optimizer()
            loss_sum, seen = client_update(self.rep, self.client_comm, self.data, self.parts[k], cfg,
                                           server_round, k, fault)
            fault = False
            if self.leader:                                    # one copy per client, not one per rank
                self.sendbuf[:n] += self.sizes[k] * be.to_host(self.rep.params)
                self.sendbuf[n:] += (self.sizes[k], loss_sum, seen)
        if self.leader:
            self.leaders.Reduce_sum(self.sendbuf, self.recvbuf, root=0)
        stats = np.zeros(3)
        if comm.rank == 0:
            self.server.step(self.global_w, (self.recvbuf[:n] / self.recvbuf[n]).astype(np.float32))
            stats[...] = self.recvbuf[n:]
        comm.Bcast(self.global_w)
        comm.Bcast(stats)
        if not math.isfinite(stats[1]):                         # every rank sees the same stats
            raise TrainingError(f"a client's training loss became {stats[1]} in round {server_round}; "
                                "try a smaller --local-lr", collective=True)
        seconds = time.perf_counter() - t0
        return {"mode": "fl", "round": server_round, "ranks": comm.size, "clients": len(sampled),
                "train_loss": stats[1] / stats[2], "test_accuracy": None, "round_seconds": seconds,
                "samples_per_second": stats[2] / seconds,
                "bytes_to_server": min(self.n_groups, len(sampled)) * self.sendbuf.nbytes}

    def evaluate(self) -> tuple[float, float]:
        """Global test accuracy and loss, each rank scoring its slice of the test set."""
        self.rep.load_params(self.global_w)
        return self.rep.evaluate(self.comm, self.data.test_x, self.data.test_y)

    def save(self, server_round: int, best: float):
        """Checkpoint at a round boundary: the global model and the server optimizer's state
        are all there is (client optimizers restart every round; partitions, client sampling
        and batch orders are pure functions of the seed and the round)."""
        if not self.cfg.checkpoint_dir:
            return None
        meta = {"step": server_round, "round": server_round, "ranks": self.comm.size, "best_accuracy": best}
        return checkpoint.save_on_root(self.comm, self.cfg, meta, lambda: {
            "params": self.global_w, **{f"server.{k}": v for k, v in self.server.state().items()}})

    def resume(self, reporter) -> tuple[int, float]:
        """Load the newest checkpoint, if any: returns (last round done, best accuracy so far)."""
        ckpt = checkpoint.restore(self.comm, self.cfg)
        if self.cfg.resume:
            reporter.resume_metrics(ckpt.step if ckpt else 0, key="round")
        if ckpt is None:
            return 0, 0.0
        self.global_w[...] = ckpt.arrays["params"]
        if self.server is not None:
            self.server.load_state({k[7:]: v for k, v in ckpt.arrays.items() if k.startswith("server.")})
        reporter.info(f"resuming from {ckpt.path} after round {ckpt.meta['round']}")
        return int(ckpt.meta["round"]), float(ckpt.meta["best_accuracy"])

    def free(self) -> None:
        if self.reducer is not None:
            self.reducer.Free()
        self.client_comm.Free()
        self.leaders.Free()


def train(cfg, comm, data, backend, reporter) -> dict:
    """Run federated training; returns a summary (final and best accuracy, history).

    With --checkpoint-dir, rank 0 checkpoints every --checkpoint-every rounds, at the end, and
    when a stop signal arrives (checked at every round boundary); then every rank raises
    Preempted. --resume goes on after the saved round: bitwise the uninterrupted run on as many
    ranks.
    """
    fed = Federation(cfg, comm, data, backend)
    reporter.info(fed.describe())
    done, best = fed.resume(reporter)
    history, stop = [], None
    with preempt.watch():
        for server_round in range(done + 1, cfg.rounds + 1):
            rec = fed.round(server_round)
            if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
                acc, test_loss = fed.evaluate()
                best = max(best, acc)
                rec.update(test_accuracy=acc, test_loss=test_loss)
            history.append(rec)
            acc_txt = f"test acc {100 * acc:6.2f}%" if rec["test_accuracy"] is not None else ""
            reporter.record(rec, f"round {server_round:4d}  loss {rec['train_loss']:.4f}  {acc_txt}  "
                                 f"{rec['round_seconds']:6.3f} s  {rec['bytes_to_server'] / 1e6:.1f} MB to server")
            if cfg.target_accuracy is not None and best >= cfg.target_accuracy:
                reporter.info(f"reached the target accuracy {100 * cfg.target_accuracy:.2f}% in round {server_round}")
                break
            # a stop signal on any rank ends the run here (one tiny allreduce per round)
            if comm.allreduce(int(preempt.requested() is not None), op="max"):
                stop = preempt.requested() or "SIGTERM/SIGUSR1 on another rank"
                break
            if cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0 and server_round < cfg.rounds:
                fed.save(server_round, best)
    fed.free()
    last_round = history[-1]["round"] if history else done
    if stop is not None:
        path = fed.save(last_round, best)
        kept = f"saved {path}; run again with --resume to continue" if path else \
            "progress is lost (no --checkpoint-dir)"
        raise Preempted(f"stopped by {stop} after round {last_round}: {kept}", collective=True)
    if history:
        fed.save(last_round, best)
    reporter.save_model(fed.global_w, fed.rep.layout.sizes)
    last = next((r["test_accuracy"] for r in reversed(history) if r["test_accuracy"] is not None), None)
    return {"history": history, "test_accuracy": last, "best_accuracy": best, "params": fed.global_w,
            "rounds": len(history)}
