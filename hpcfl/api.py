"""The composition root: everything a run needs, put together in one place for the command line
and the Python API (`hpcfl.train`).

Order matters, and every check that can come out differently on different ranks is agreed by
all of them (comm.agree_all) before anything is written:
  settings -> launch -> fault switch -> threads -> backend (one for the whole job) -> GPU ->
  outputs writable -> data (rank 0 prepares and verifies the cache, every rank opens it) ->
  memory plan -> run locks -> trainer (the metrics file is opened only once training starts).
A refused run therefore leaves every existing file as it was.
"""
from __future__ import annotations

import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import backends, config as config_mod, data as data_mod, log
from .data import catalogue as datasets
from .runtime import faults
from .runtime import preempt
from .parallel.comm import Comm, check_launch, host_name
from .config import Config
from .errors import HpcflError, UsageError
from .core.model import Model
from .io.locks import RunLock
from .io.report import Reporter
from .runtime.watchdog import Watchdog


@dataclass
class Result:
    """What hpcfl.train returns on every rank."""
    test_accuracy: float | None      # the last evaluated test accuracy
    history: list                    # the metrics records, one per epoch (dp) or round (fl)
    model: Model                     # the trained model (rank-independent)
    config: Config                   # the settings that ran (defaults resolved)
    best_accuracy: float | None = None
    extra: dict = field(default_factory=dict)


def _as_comm(comm) -> Comm:
    if comm is None:
        return Comm.world()
    if isinstance(comm, Comm):
        return comm
    return Comm(comm)                  # an mpi4py communicator


def train(config: Config, *, comm=None, callbacks=(), handle_signals: bool = False,
          report_result: bool = False) -> Result:
    """Train per config.mode (dp or fl) on every rank of `comm` (default: MPI_COMM_WORLD; one
    process in a notebook). Every rank calls it and gets the same Result.

    Errors are hpcfl exceptions (UsageError, DataError, TrainingError, Preempted). In a run of
    several ranks an error that only one rank meets cannot be raised there alone (the others
    would wait forever in the next collective): that rank prints it and aborts the job.
    callbacks: callables receiving each epoch/round record on rank 0; raising
    hpcfl.StopTraining ends training early (the result is then returned as usual).
    handle_signals: SIGTERM/SIGUSR1 then checkpoint and raise Preempted instead of killing the
    process (the command line always asks for this).
    report_result: log the final accuracy even with quiet=True (the command line's --quiet);
    without it a quiet run prints nothing on stdout. Messages go to the `hpcfl` logger (log.py).
    """
    comm = _as_comm(comm)
    with preempt.handling(handle_signals):
        try:
            return guarded(comm, lambda: _train(config, comm, callbacks, report_result))
        finally:
            log.reset()


def guarded(comm: Comm, fn):
    """Run fn(); agreed errors propagate on every rank; a lone rank's error aborts the job."""
    try:
        return fn()
    except HpcflError as exc:
        if exc.collective or comm.size == 1:
            raise
        print(f"hpcfl: error on rank {comm.rank} ({host_name()}): {exc}; aborting all ranks",
              file=sys.stderr, flush=True)
        comm.Abort(exc.exit_code)
    except Exception as exc:
        if comm.size == 1:
            raise
        print(f"hpcfl: rank {comm.rank} failed: {describe_exception(exc)}; aborting all ranks "
              "(HPCFL_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        if os.environ.get("HPCFL_DEBUG"):
            traceback.print_exc()
        comm.Abort(1)
    raise AssertionError("unreachable")


def describe_exception(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _collective(fn):
    """Run fn() where every rank computes the same thing: its UsageError is collective."""
    try:
        return fn()
    except HpcflError as exc:
        exc.collective = True
        raise


def _threads(cfg: Config, comm: Comm, reporter_rank0: bool) -> Config:
    """--threads above the cores this rank may run on only oversubscribes: cap it, say so once."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    cores = comm.allreduce(cores, "min")
    if cfg.threads > cores:
        if reporter_rank0:
            log.warning(f"--threads {cfg.threads} is more than the {cores} core"
                        f"{'s' if cores > 1 else ''} a rank may use here: using {cores}")
        cfg = cfg.replace(threads=cores)
    backends.set_threads(cfg.threads)
    return cfg


def resolve_backend(cfg: Config, comm: Comm):
    """One backend for the whole job. 'auto': the first of cupy, numba, numpy usable on EVERY
    rank (a rank without a GPU makes the job use numba, with a warning). A named backend must
    load on every rank, else one error names the ranks where it does not."""
    if cfg.backend == "auto":
        usable = comm.allgather([n for n in backends.NAMES if backends.available()[n] == "ok"])
        common = [n for n in ("cupy", "numba", "numpy") if all(n in u for u in usable)]
        name = common[0]
        best = [next(n for n in ("cupy", "numba", "numpy") if n in u) for u in usable]
        if comm.rank == 0 and any(b != name for b in best):
            ranks = [r for r, b in enumerate(best) if b != name]
            log.warning(f"--backend auto: using {name} on every rank ({', '.join(map(str, ranks))} "
                        f"of {comm.size} could use another backend, but not every rank can)")
    else:
        name = cfg.backend

    def load():
        try:
            return backends.get(name)
        except (backends.BackendUnavailable, ImportError) as exc:
            raise UsageError(str(exc))

    backend = comm.agree_all(load)
    return cfg.replace(backend=name), backend


def _check_outputs(cfg: Config, comm: Comm) -> None:
    """Fail before training, not after it, when an output cannot be written."""
    from .io.files import check_writable_dir

    def check():
        if cfg.metrics and Path(cfg.metrics).is_symlink():
            raise UsageError(f"--metrics {cfg.metrics}: is a symbolic link; refusing to write through "
                             "it (give the path of a regular file)")
        if cfg.metrics and Path(cfg.metrics).is_dir():
            raise UsageError(f"--metrics {cfg.metrics}: is a folder; give the path of a file (e.g. run.jsonl)")
        if cfg.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboardX") is None:
                raise UsageError("--tensorboard needs tensorboardX: pip install -e '.[tensorboard]'")
        for what, path in (("--out", cfg.out), ("--checkpoint-dir", cfg.checkpoint_dir),
                           ("--tensorboard", cfg.tensorboard),
                           ("--metrics", cfg.metrics and str(Path(cfg.metrics).parent))):
            if path:
                try:
                    check_writable_dir(path)
                except OSError as exc:
                    raise UsageError(f"{what} {path}: cannot write there ({exc.strerror or exc})")

    comm.agree(check)


def _check_not_replacing(cfg: Config, comm: Comm) -> None:
    """A run never replaces an earlier run's metrics, model or TensorBoard events: refused by name
    unless --overwrite (or --resume, which continues that run)."""
    if cfg.overwrite or cfg.resume:
        return

    def check():
        found = []
        if cfg.metrics and Path(cfg.metrics).is_file() and Path(cfg.metrics).stat().st_size:
            found.append(f"--metrics {cfg.metrics}")
        if cfg.out and (Path(cfg.out) / "model.npz").exists():
            found.append(f"--out {cfg.out} (its model.npz)")
        if cfg.tensorboard and any(Path(cfg.tensorboard).glob("events.out.tfevents.*")):
            found.append(f"--tensorboard {cfg.tensorboard} (its event files)")
        if found:
            raise UsageError(f"{found[0]} holds the results of an earlier run: give another path, "
                             f"--overwrite to replace them, or --resume to continue that run")

    comm.agree(check)


def load_dataset(name: str = "mnist", data_dir=None, *, comm=None, fetch: bool = True) -> data_mod.Dataset:
    """The data set `name` (hpcfl.datasets.CATALOGUE, or 'idx' / 'npz' with data_dir), ready
    to read: rank 0 fetches it if missing (catalogue sets), validates it and prepares or
    verifies the cache; then every rank opens the cache (memory-mapped) and all ranks agree
    that they could."""
    comm = _as_comm(comm)
    spec = _collective(lambda: datasets.get(name))
    source = _collective(lambda: data_mod.resolve_data_dir(data_dir, name))

    def prepare():  # rank 0 only; the others wait
        if fetch and data_mod.missing_files(source, spec) and spec.format == "idx" and (spec.urls or spec.archive):
            data_mod.fetch(source, spec=spec)
        return str(data_mod.prepare_cache(source, spec=spec))

    path = comm.agree(prepare)
    return comm.agree_all(lambda: data_mod.open_cache(path))


def _available_memory() -> int | None:
    """Bytes this node can still give (MemAvailable, or the cgroup's limit if lower)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
            used = Path(path).with_name("memory.current" if path.endswith(".max") else "memory.usage_in_bytes")
            if text.isdigit():
                avail = min(avail, int(text) - int(used.read_text().strip()))
        except (OSError, ValueError):
            continue
    return avail


def _check_memory(cfg: Config, comm: Comm, layout, data) -> None:
    """Refuse a plan whose preallocated buffers cannot fit, before allocating them (a 95 GiB
    MemoryError printed by every rank otherwise), naming the option that makes it big."""
    from .training import federated as fl
    from .core import replica

    node = comm.node_comm()
    local = node.size
    node.Free()
    if cfg.mode == "dp":
        batch_opt, rows = "--batch-size", math.ceil(cfg.batch_size / comm.size)
        plan = replica.buffer_bytes(cfg, layout, rows)
    else:
        batch_opt = "--local-batch-size"
        plan = replica.buffer_bytes(cfg.replace(optimizer="sgd"), layout,
                                    fl.max_local_batch(cfg, _client_sizes(cfg, data)))
        plan["model"] += fl.buffer_bytes(cfg, layout, comm.rank == 0, comm.size // cfg.ranks_per_client)
    need = sum(plan.values())
    avail = _available_memory()

    def check():
        if avail is not None and need * local > avail:
            what = batch_opt if plan["batch"] > plan["model"] else "--hidden"
            raise UsageError(f"{what}: this run needs {need / 2**30:.1f} GiB of buffers per rank "
                             f"(model {plan['model'] / 2**30:.2f} GiB, batch {plan['batch'] / 2**30:.2f} GiB) "
                             f"x {local} rank{'s' if local > 1 else ''} on this node, but only "
                             f"{avail / 2**30:.1f} GiB are available: reduce {what}")

    comm.agree_all(check)


def _client_sizes(cfg, data):
    import numpy as np

    from .fl import partition

    parts = _collective(lambda: partition.make(cfg.partition, np.asarray(data.train_y), cfg.num_clients,
                                               cfg.seed, cfg.alpha))
    return np.array([len(p) for p in parts])


def dp_sampling(cfg: Config, n_train: int) -> tuple[float, int, float]:
    """(q, steps, expected) of a DP run: the sampling rate, the steps (dp) or rounds (fl) the
    noise is calibrated for, and the expected count sampled (the fixed denominator)."""
    if cfg.mode == "fl":
        return cfg.client_fraction, cfg.rounds, cfg.client_fraction * cfg.num_clients
    steps = cfg.epochs * (n_train // cfg.batch_size)
    return cfg.batch_size / n_train, min(steps, cfg.max_steps) if cfg.max_steps else steps, float(cfg.batch_size)


def calibrate(cfg: Config, n_train: int) -> tuple[float, float]:
    """(DP-PCA's noise multiplier, 0 without it; z) that --dp-epsilon calibrates: pure, the same
    on every rank; a budget that cannot be met is a UsageError. Also --print-config's."""
    from .privacy import accountant as privacy

    q, steps, _ = dp_sampling(cfg, n_train)
    try:
        if cfg.mode == "fl" and cfg.secure_agg:
            return 0.0, privacy.calibrate_secure_noise(q, steps, cfg.dp_delta, cfg.dp_epsilon)
        sigma = 0.0
        if config_mod.pca_directions(cfg):
            sigma = cfg.dp_pca_noise or privacy.pca_noise_for(cfg.dp_epsilon, cfg.dp_delta)
        prior = [(1.0, sigma, 1)] if sigma else []
        return sigma, privacy.calibrate_noise(q, steps, cfg.dp_delta, cfg.dp_epsilon, prior=prior)
    except ValueError as exc:
        raise UsageError(f"--dp-epsilon {cfg.dp_epsilon:g}: {exc}")


def plan_privacy(cfg: Config, comm: Comm, data):
    """The run's DP plan (privacy.DpPlan), or None without DP: the sampling rate, the expected
    count, the noise multiplier (calibrated on rank 0 for --dp-epsilon: a second or two) and
    the secret seed of the noise and of the sampling (rank 0 draws it, unless given)."""
    import secrets

    from .privacy import accountant as privacy

    if not config_mod.dp_on(cfg):
        return None
    q, steps, expected = dp_sampling(cfg, data.n_train)
    secure = cfg.mode == "fl" and cfg.secure_agg
    pca = config_mod.pca_directions(cfg)
    if cfg.dp_noise is not None:
        z, pca_noise = cfg.dp_noise, cfg.dp_pca_noise or 0.0
    else:
        pca_noise, z = comm.agree(lambda: calibrate(cfg, data.n_train))
    share_std = 0.0
    if secure:
        # each share is sized so that a low quantile of the honest survivors still adds up to z
        honest = privacy.honest_quantile(cfg.num_clients, q, cfg.dropout_rate, cfg.dp_colluders)
        if honest < 1:
            raise UsageError(f"DP with --secure-agg: in {100 * privacy.SECURE_QUANTILE:g}% of rounds at most "
                             f"{honest + 1 + cfg.dp_colluders} of the {cfg.num_clients} clients survive "
                             f"(--client-fraction {q:g}, --dropout-rate {cfg.dropout_rate:g}), which leaves no "
                             f"honest noise share besides a client's own once --dp-colluders "
                             f"{cfg.dp_colluders} are counted out: raise --client-fraction or --num-clients",
                             collective=True)
        share_std = z * cfg.dp_clip / (honest ** 0.5)
    # 256 bits from the OS (the noise's AES keys derive from it), unless given to reproduce a run
    seed = cfg.dp_noise_seed if cfg.dp_noise_seed is not None else comm.bcast(
        secrets.randbits(256) if comm.rank == 0 else None)
    return privacy.DpPlan(clip=cfg.dp_clip, z=z, q=q, expected=expected, noise_seed=seed, delta=cfg.dp_delta,
                          target=cfg.dp_epsilon, secure=secure, share_std=share_std, colluders=cfg.dp_colluders,
                          pca=pca, pca_noise=pca_noise)


def _train(config: Config, comm: Comm, callbacks, report_result: bool) -> Result:
    from .core import layout as model

    cfg = config
    _collective(lambda: config_mod.validate(cfg, comm.size))
    comm.agree_all(lambda: log.configure(comm.rank, cfg.log_level, quiet=cfg.quiet,
                                         show_result=report_result, log_file=cfg.log_file))
    if comm.is_world():
        check_launch(comm.size)
    comm.agree_all(lambda: faults.arm(comm.rank))
    cfg = _threads(cfg, comm, comm.rank == 0)
    # Overflow in a diverging run would warn on every rank; the trainers check the (reduced)
    # loss for NaN/Inf every step and stop with one message naming the step instead.
    import numpy as np

    np.seterr(over="ignore", invalid="ignore", divide="ignore")
    cfg, backend = resolve_backend(cfg, comm)
    if cfg.allreduce == "overlap" and cfg.backend == "cupy":   # device collectives are blocking (comm.py)
        raise UsageError("--allreduce overlap works on host buffers only: with --backend cupy use "
                         "fused (MPI) or nccl", collective=True)
    if cfg.allreduce == "shm" and cfg.backend == "cupy":
        raise UsageError("--allreduce shm sums host memory: with --backend cupy use fused or nccl",
                         collective=True)
    if cfg.allreduce == "nccl" and cfg.backend != "cupy":
        raise UsageError(f"--allreduce nccl sums GPU buffers: it needs --backend cupy (this run's "
                         f"backend is {cfg.backend})", collective=True)
    if cfg.backend == "cupy":                 # one GPU per rank on a node, by node-local rank
        from .parallel.comm import local_rank

        where = local_rank(comm)
        comm.agree_all(lambda: backend.select_device(where))
    _check_outputs(cfg, comm)
    _check_not_replacing(cfg, comm)
    data = load_dataset(cfg.dataset, cfg.data_dir, comm=comm)
    inputs = config_mod.pca_directions(cfg) or data.input_size
    if inputs > data.input_size:
        raise UsageError(f"--dp-pca {cfg.dp_pca}: more directions than the {data.input_size} values of "
                         f"a {data.name} image", collective=True)
    layout = model.layout(cfg.hidden, inputs, data.num_classes)
    _check_memory(cfg, comm, layout, data)
    dp_plan = plan_privacy(cfg, comm, data)
    lock = RunLock()
    try:
        def take_locks():
            for what, path, is_dir in (("--checkpoint-dir", cfg.checkpoint_dir, True),
                                       ("--out", cfg.out, True), ("--metrics", cfg.metrics, False)):
                if path:
                    lock.acquire(what, path, is_dir)

        try:
            comm.agree(take_locks)
        except HpcflError:
            lock.release()
            raise
        if cfg.backend == "cupy":             # GPU-resident data: uploaded once (47 MB of uint8)
            import dataclasses

            data = dataclasses.replace(data, **{k: backend.upload_images(getattr(data, k))
                                                for k in ("train_x", "train_y", "test_x", "test_y")})
        reporter = Reporter(cfg, comm.rank, callbacks, dataset=data)
        made = config_mod.derived(cfg)
        if made:
            reporter.info("derived settings: " + ", ".join(f"{config_mod.flag(n)} {config_mod._text(v)}"
                                                          for n, v in made.items()))
        try:
            faults.at_step(comm.rank, 0)      # tests only: step 0 is start-up
            timeout = cfg.stall_timeout if comm.size > 1 else 0
            with Watchdog(timeout, comm.rank, host_name(), comm.Abort):
                if cfg.mode == "dp":
                    from .training import dataparallel as dp

                    summary = dp.train(cfg, comm, data, backend, reporter, layout, dp_plan)
                else:
                    from .training import federated as fl

                    summary = fl.train(cfg, comm, data, backend, reporter, layout, dp_plan)
        finally:
            reporter.close()
        if summary["test_accuracy"] is not None:
            reporter.result(f"final test accuracy {100 * summary['test_accuracy']:.2f}%")
    finally:
        if comm.rank == 0:
            lock.release()
    trained = Model(tuple(layout.sizes), summary["params"], dataset=data.name,
                    image_shape=tuple(data.image_shape), num_classes=data.num_classes,
                    mean=data.mean, std=data.std, projection=summary.get("projection"))
    extra = {k: v for k, v in summary.items()
             if k not in ("history", "test_accuracy", "params", "best_accuracy", "projection")}
    return Result(summary["test_accuracy"], summary["history"], trained, cfg,
                  summary.get("best_accuracy"), extra)
