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

from . import aggregate, faults, partition
from .dp import Replica
from .errors import TrainingError, UsageError


def client_update(rep: Replica, comm, data, idx: np.ndarray, cfg, server_round: int, client: int,
                  fault: bool = False) -> tuple[float, int]:
    """Local training of one client from the weights in rep; returns (summed loss, samples seen).

    The batch order is seeded by (seed, round, client, local epoch); the last batch of an
    epoch may be smaller (clients of a non-IID split can hold fewer samples than a batch).
    """
    B, loss_sum, seen = cfg.local_batch_size, 0.0, 0
    for e in range(cfg.local_epochs):
        order = idx[np.random.default_rng([cfg.seed, server_round, client, e]).permutation(len(idx))]
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


def train(cfg, comm, data, backend, reporter) -> dict:
    R = cfg.ranks_per_client
    n_groups, group = comm.size // R, comm.rank // R
    client_comm = comm.Split(group, comm.rank)            # the R ranks that train one client
    leader = client_comm.rank == 0
    leaders = comm.Split(0 if leader else 1, comm.rank)   # group leaders; world rank 0 is its rank 0
    try:
        parts = partition.make(cfg.partition, backend.to_host(data.train_y), cfg.num_clients,
                               cfg.seed, cfg.alpha)
    except UsageError as exc:                              # computed alike on every rank
        exc.collective = True
        raise
    sizes = np.array([len(p) for p in parts])
    # FL local training is plain SGD, as in the paper; server momentum is --server-opt fedavgm
    local_cfg = cfg.replace(optimizer="sgd", momentum=0.0, weight_decay=0.0)
    rep = Replica(local_cfg, backend, max_local_batch=math.ceil(cfg.local_batch_size / R))
    n = rep.layout.n_params
    global_w = backend.to_host(rep.params).copy()          # identical on every rank (seeded init)
    server = aggregate.make(cfg, n) if comm.rank == 0 else None
    # [sum_k n_k w_k | sum_k n_k | loss sum | samples seen]; float64 so big sums stay exact
    sendbuf = np.zeros(n + 3, np.float64)
    recvbuf = np.zeros(n + 3, np.float64) if comm.rank == 0 else None
    if cfg.mu > 0:
        anchor = backend.to_device(global_w)
        rep.proximal = (cfg.mu, anchor)
    per_round = max(1, int(round(cfg.client_fraction * cfg.num_clients)))
    reporter.info(f"fl: {comm.size} ranks in {n_groups} client groups of {R}, {cfg.num_clients} clients "
                  f"({cfg.partition}), {per_round} per round, E={cfg.local_epochs} B={cfg.local_batch_size} "
                  f"lr={cfg.local_lr}, server {cfg.server_opt} lr={cfg.server_lr}, "
                  f"model {'-'.join(map(str, rep.layout.sizes))}")
    history, best = [], 0.0
    for server_round in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        sampled = partition.sample_clients(cfg.num_clients, cfg.client_fraction, server_round, cfg.seed)
        mine = partition.assign_to_groups(sampled, sizes, n_groups)[group]
        sendbuf[...] = 0
        if cfg.mu > 0:
            anchor[...] = backend.to_device(global_w)
        fault = faults.at_step(comm.rank, server_round)   # tests only; in fl mode STEP is the round
        for k in mine:
            rep.load_params(global_w)
            rep.reset_optimizer()
            loss_sum, seen = client_update(rep, client_comm, data, parts[k], cfg, server_round, k, fault)
            fault = False
            if leader:                                     # one copy per client, not one per rank
                sendbuf[:n] += sizes[k] * backend.to_host(rep.params)
                sendbuf[n:] += (sizes[k], loss_sum, seen)
        if leader:
            leaders.Reduce_sum(sendbuf, recvbuf, root=0)
        if comm.rank == 0:
            server.step(global_w, (recvbuf[:n] / recvbuf[n]).astype(np.float32))
            stats = recvbuf[n:].copy()
        else:
            stats = np.zeros(3)
        comm.Bcast(global_w)
        comm.Bcast(stats)
        if not math.isfinite(stats[1]):                   # every rank sees the same stats
            raise TrainingError(f"a client's training loss became {stats[1]} in round {server_round}; "
                                "try a smaller --local-lr", collective=True)
        seconds = time.perf_counter() - t0
        rec = {"mode": "fl", "round": server_round, "ranks": comm.size, "clients": len(sampled),
               "train_loss": stats[1] / stats[2], "test_accuracy": None, "round_seconds": seconds,
               "samples_per_second": stats[2] / seconds,
               "bytes_to_server": min(n_groups, len(sampled)) * sendbuf.nbytes}
        if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
            rep.load_params(global_w)
            acc, test_loss = rep.evaluate(comm, data.test_x, data.test_y)
            best = max(best, acc)
            rec.update(test_accuracy=acc, test_loss=test_loss)
        history.append(rec)
        acc_txt = f"test acc {100 * rec['test_accuracy']:6.2f}%" if rec["test_accuracy"] is not None else ""
        reporter.record(rec, f"round {server_round:4d}  loss {rec['train_loss']:.4f}  {acc_txt}  "
                             f"{seconds:6.3f} s  {rec['bytes_to_server'] / 1e6:.1f} MB to server")
        if cfg.target_accuracy is not None and best >= cfg.target_accuracy:
            reporter.info(f"reached the target accuracy {100 * cfg.target_accuracy:.2f}% in round {server_round}")
            break
    client_comm.Free()
    leaders.Free()
    reporter.save_model(global_w, rep.layout.sizes)
    last = next((r["test_accuracy"] for r in reversed(history) if r["test_accuracy"] is not None), None)
    return {"history": history, "test_accuracy": last, "best_accuracy": best, "params": global_w,
            "rounds": len(history)}
