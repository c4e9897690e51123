"""Command line: `python -m hpcfl [train] [options]`, `python -m hpcfl info`, `python -m hpcfl fetch-data`.

Every rank parses the same argv, so a usage error is raised identically on every rank: each
exits with code 2 and only rank 0 prints the message.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import Config, validate
from .errors import UsageError

DEFAULTS = Config()


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting (which every rank would do)."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)", collective=True)

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip(), collective=True)
        raise SystemExit(status)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


def _hidden(text):
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 256,128, got {text!r}")
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def _unit_interval(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def train_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _Parser(prog="python -m hpcfl", description="Train an MLP on MNIST with MPI "
                "(data parallel or federated). Run under mpirun/srun for several ranks.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                epilog="Other commands: `python -m hpcfl info`, `python -m hpcfl fetch-data`. "
                       "Exit codes: 0 done, 1 error, 2 bad usage, 75 stopped by SIGTERM/SIGUSR1 "
                       "(checkpointed: run again with --resume).")
    p.add_argument("--mode", choices=["dp", "fl"], default=d.mode, help="data parallel or federated")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--hidden", type=_hidden, default=d.hidden, help="hidden layer sizes, e.g. 256,128")
    g.add_argument("--epochs", type=_positive(int), default=d.epochs)
    g.add_argument("--batch-size", type=_positive(int), default=d.batch_size, help="global batch (dp)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    g.add_argument("--lr", type=_positive(float), default=d.lr)
    g.add_argument("--momentum", type=_non_negative(float), default=d.momentum)
    g.add_argument("--weight-decay", type=_non_negative(float), default=d.weight_decay)
    g.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule)
    g.add_argument("--max-steps", type=_positive(int), default=None,
                   help="stop after this many optimizer steps (smoke runs, benchmarks)")
    f = p.add_argument_group("federated (--mode fl)")
    f.add_argument("--rounds", type=_positive(int), default=d.rounds)
    f.add_argument("--num-clients", type=_positive(int), default=d.num_clients)
    f.add_argument("--ranks-per-client", type=_positive(int), default=d.ranks_per_client)
    f.add_argument("--client-fraction", type=_unit_interval, default=d.client_fraction)
    f.add_argument("--partition", choices=["iid", "shards", "dirichlet"], default=d.partition)
    f.add_argument("--alpha", type=_positive(float), default=d.alpha, help="Dirichlet concentration")
    f.add_argument("--local-epochs", type=_positive(int), default=d.local_epochs)
    f.add_argument("--local-batch-size", type=_positive(int), default=d.local_batch_size)
    f.add_argument("--local-lr", type=_positive(float), default=d.local_lr)
    f.add_argument("--mu", type=_non_negative(float), default=d.mu, help="FedProx proximal weight")
    f.add_argument("--server-opt", choices=["fedavg", "fedavgm", "fedadam"], default=d.server_opt)
    f.add_argument("--server-lr", type=_positive(float), default=d.server_lr)
    f.add_argument("--server-momentum", type=_non_negative(float), default=d.server_momentum)
    f.add_argument("--eval-every", type=_positive(int), default=d.eval_every, help="rounds between evaluations")
    g.add_argument("--target-accuracy", type=_unit_interval, default=None,
                   help="stop once the test accuracy reaches this (time-to-accuracy runs)")
    m = p.add_argument_group("machinery")
    m.add_argument("--backend", choices=["auto", "numpy", "numba", "cupy"], default=d.backend)
    m.add_argument("--threads", type=_positive(int), default=d.threads, help="BLAS/Numba threads per rank")
    m.add_argument("--allreduce", choices=["fused", "overlap", "nccl"], default=d.allreduce,
                   help="gradient sync: one blocking MPI Allreduce of the flat buffer per step, a "
                        "non-blocking Iallreduce per layer started during the backward pass, or one "
                        "NCCL allreduce per step (--backend cupy, one GPU per rank)")
    m.add_argument("--seed", type=_non_negative(int), default=d.seed)
    m.add_argument("--data-dir", default=None, help="MNIST folder (default: $HPCFL_DATA_DIR, else a user cache folder)")
    m.add_argument("--metrics", default=None, help="JSON Lines file, one record per epoch/round")
    m.add_argument("--out", default=None, help="folder for the final model (.npz) and config (.json)")
    m.add_argument("--quiet", action="store_true")
    m.add_argument("--checkpoint-dir", default=None,
                   help="folder for checkpoints (rank 0 writes ckpt-<step>.npz); on SIGTERM/SIGUSR1 the "
                        "run saves one there and exits with code 75")
    m.add_argument("--checkpoint-every", type=_non_negative(int), default=d.checkpoint_every,
                   help="epochs (dp) or rounds (fl) between checkpoints; 0: only on preemption and at the end")
    m.add_argument("--keep-checkpoints", type=_positive(int), default=d.keep_checkpoints,
                   help="how many of the newest checkpoints to keep")
    m.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint in --checkpoint-dir (start from scratch if none)")
    return p


def parse_config(argv: list[str], world_size: int) -> Config:
    ns = vars(train_parser().parse_args(argv))
    names = {fld.name for fld in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in ns.items() if k in names})
    try:
        validate(cfg, world_size)
    except UsageError as exc:
        exc.collective = True
        raise
    return cfg


def _load_data(cfg, comm):
    from . import data

    data_dir = data.resolve_data_dir(cfg.data_dir)

    def prepare():  # rank 0 only: fetch if missing, validate, convert; the others wait
        if data.missing_files(data_dir):
            data.fetch(data_dir)
        return str(data.prepare_cache(data_dir))

    return data.open_cache(comm.agree(prepare))


def _check_outputs(cfg, comm):
    """Fail before training, not after it, when an output folder cannot be written."""
    from pathlib import Path

    from .files import check_writable_dir

    def check():
        for what, path in (("--out", cfg.out), ("--checkpoint-dir", cfg.checkpoint_dir),
                           ("--metrics", cfg.metrics and str(Path(cfg.metrics).parent))):
            if path:
                try:
                    check_writable_dir(path)
                except OSError as exc:
                    raise UsageError(f"{what} {path}: cannot write there ({exc.strerror or exc})")

    comm.agree(check)


def train(comm, argv) -> int:
    cfg = parse_config(argv, comm.size)
    from . import preempt

    # From here on SIGTERM/SIGUSR1 only set a flag, also while the data loads: the first step
    # (dp) or round (fl) then stops every rank with a checkpoint, instead of one rank dying.
    with preempt.watch():
        return _train(comm, cfg)


def _train(comm, cfg) -> int:
    from . import backends
    from .report import Reporter

    backends.set_threads(cfg.threads)
    # Overflow in a diverging run would warn on every rank; the trainers check the (reduced)
    # loss for NaN/Inf every step and stop with one message naming the step instead.
    import numpy as np

    np.seterr(over="ignore", invalid="ignore", divide="ignore")
    name = backends.resolve(cfg.backend)
    try:
        backend = backends.get(name)
    except backends.BackendUnavailable as exc:
        raise UsageError(str(exc), collective=True)
    cfg = cfg.replace(backend=name)
    if cfg.allreduce == "overlap" and name == "cupy":   # device collectives are blocking (comm.py)
        raise UsageError("--allreduce overlap works on host buffers only: with --backend cupy use "
                         "fused (MPI) or nccl", collective=True)
    if cfg.allreduce == "nccl" and name != "cupy":
        raise UsageError(f"--allreduce nccl sums GPU buffers: it needs --backend cupy (this run's "
                         f"backend is {name})", collective=True)
    if name == "cupy":                        # one GPU per rank on a node, by node-local rank
        from .comm import local_rank

        backend.select_device(local_rank(comm))
    _check_outputs(cfg, comm)
    data = _load_data(cfg, comm)
    if name == "cupy":                        # GPU-resident data: uploaded once (47 MB of uint8)
        import dataclasses

        data = dataclasses.replace(data, **{k: backend.upload_images(getattr(data, k))
                                            for k in ("train_x", "train_y", "test_x", "test_y")})
    reporter = Reporter(cfg, comm.rank)
    from . import faults

    faults.at_step(comm.rank, 0)              # tests only: step 0 is start-up
    if cfg.mode == "dp":
        from . import dp

        summary = dp.train(cfg, comm, data, backend, reporter)
    else:
        from . import fl

        summary = fl.train(cfg, comm, data, backend, reporter)
    if summary["test_accuracy"] is not None:
        reporter.info(f"final test accuracy {100 * summary['test_accuracy']:.2f}%")
    return 0


def info(comm, argv) -> int:
    from . import backends, comm as comm_mod

    _Parser(prog="python -m hpcfl info", description="Show MPI, ranks, backends and GPU.").parse_args(argv)
    avail = backends.available()
    hosts = comm.allgather(os.uname().nodename)
    if comm.rank == 0:
        import numpy

        print(f"hpcfl {__import__('hpcfl').__version__}, Python {sys.version.split()[0]}, NumPy {numpy.__version__}")
        print(f"MPI: {comm_mod.library_version()}")
        print(f"ranks: {comm.size} on {len(set(hosts))} node(s): {', '.join(sorted(set(hosts)))}")
        for name, status in avail.items():
            print(f"backend {name:6s}: {status}")
        print(f"auto picks: {backends.resolve('auto')}")
        gpu = backends.gpu_description()
        print(f"GPU: {gpu or 'none usable'}")
    return 0


def fetch_data(comm, argv) -> int:
    from . import data

    p = _Parser(prog="python -m hpcfl fetch-data",
                description="Download the four MNIST files and verify their published MD5 sums "
                            "(run once on a login node with internet).")
    p.add_argument("--data-dir", default=None)
    ns = p.parse_args(argv)
    data_dir = data.resolve_data_dir(ns.data_dir)

    def work():
        data.fetch(data_dir)
        data.prepare_cache(data_dir)
        return str(data_dir)

    where = comm.agree(work)
    if comm.rank == 0:
        print(f"MNIST ready in {where}")
    return 0


COMMANDS = {"train": train, "info": info, "fetch-data": fetch_data}


def _dispatch(comm, argv) -> int:
    if argv and argv[0] in COMMANDS:
        command, argv = COMMANDS[argv[0]], argv[1:]
    else:
        command = train
    try:
        return command(comm, argv)
    except SystemExit as exc:  # --help: printed on rank 0 only (below), exit 0 everywhere
        return exc.code or 0


def main(argv: list[str] | None = None) -> int:
    from .comm import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return _help(argv)
    return run_main(_dispatch, argv)


def _help(argv) -> int:
    """Print help on rank 0 only; never touches data or backends."""
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID", "0"))))
    if rank == 0:
        if argv and argv[0] == "info":
            print("usage: python -m hpcfl info\n\nShow MPI library, ranks, backends and GPU.")
        elif argv and argv[0] == "fetch-data":
            print("usage: python -m hpcfl fetch-data [--data-dir DIR]\n\nDownload MNIST and verify checksums.")
        else:
            train_parser().print_help()
    return 0
