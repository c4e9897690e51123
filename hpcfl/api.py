"""The composition root: everything a run needs, put together in one place for the command line
and the Python API (`hpcfl.train`).

The start-up stages, in order (_train); every check that can come out differently on different
ranks is agreed by all of them (comm.agree_all) before anything is written:
  settle      the settings validated, logging, the launch, the test hooks, threads
  machine     one backend for the whole job, its GPU
  outputs     writable, and not an earlier run's (unless --overwrite / --resume)
  data        rank 0 prepares and verifies the cache, every rank opens it; the model's layout
              and the memory plan
  privacy     the DP plan (noise calibrated to --dp-epsilon, the secret seed)
  locks       one run per output path
  trainer     dp or fl (the metrics file is opened only once training starts)
A refused run therefore leaves every existing file as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import backends, log
from . import config as config_mod
from . import data as data_mod
from .config import Config
from .core.model import Model
from .data import catalogue
from .errors import HpcflError, UsageError, computed_alike
from .io.locks import RunLock
from .io.report import Reporter
from .parallel.comm import Comm, abort_job, host_name
from .parallel.launch import check_launch
from .runtime import preempt, testing
from .runtime.watchdog import Watchdog

if TYPE_CHECKING:
    from .backends.base import Backend
    from .core.layout import Layout
    from .privacy.plan import DpPlan
    from .training.loop import Summary

logger = logging.getLogger(__name__)


@dataclass
class Result:
    """What hpcfl.train returns on every rank."""
    test_accuracy: float | None      # the last evaluated test accuracy
    history: list                    # the metrics records, one per epoch (dp) or round (fl)
    model: Model                     # the trained model (rank-independent)
    config: Config                   # the settings that ran (defaults resolved)
    best_accuracy: float | None = None
    extra: dict = field(default_factory=dict)


def _as_comm(comm: Any) -> Comm:
    if comm is None:
        return Comm.world()
    if isinstance(comm, Comm):
        return comm
    return Comm(comm)                  # an mpi4py communicator


def train(config: Config, *, comm: Any = None, callbacks: Sequence[Callable[[dict], None]] = (),
          handle_signals: bool = False, report_result: bool = False) -> Result:
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
    world = _as_comm(comm)
    with preempt.handling(handle_signals):
        try:
            return guarded(world, lambda: _train(config, world, callbacks, report_result))
        except HpcflError as exc:             # spoken to an API user: Config keywords, not flags
            if config_mod.SPELLING.get() == "api":
                exc.args = (config_mod.api_spelling(str(exc)), *exc.args[1:])
            raise
        finally:
            log.reset()


def guarded(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run fn(); agreed errors propagate on every rank; a lone rank's error aborts the job."""
    try:
        return fn()
    except HpcflError as exc:
        if exc.collective or comm.size == 1:
            raise
        abort_job(comm, exc)
    except Exception as exc:
        if comm.size == 1:
            raise
        abort_job(comm, exc)
    raise AssertionError("unreachable")


def _train(config: Config, comm: Comm, callbacks: Sequence[Callable[[dict], None]], report_result: bool) -> Result:
    cfg, hooks = _settle(config, comm, report_result)
    cfg, backend = _machine(cfg, comm)
    _check_outputs(cfg, comm)
    _check_not_replacing(cfg, comm)
    data, layout = _data(cfg, comm)
    from .privacy.plan import create_plan

    plan = create_plan(cfg, comm, data.n_train)
    if plan is not None:      # fixed constants, not the private training set's mean and std
        from .privacy.plan import scale_warning

        mean, std = catalogue.dp_normalisation(cfg.dataset)
        data = dataclasses.replace(data, mean=mean, std=std)
        warning = scale_warning(cfg)
        if warning:
            logger.warning(warning)
    with _locks(cfg, comm):
        if cfg.backend == "cupy":             # GPU-resident data: uploaded once (47 MB of uint8)
            data = dataclasses.replace(data, **{k: backend.upload_images(getattr(data, k))
                                                for k in ("train_x", "train_y", "test_x", "test_y")})
        reporter = Reporter(cfg, comm.rank, callbacks, dataset=data)
        summary = _run_trainer(cfg, comm, data, backend, reporter, layout, plan, hooks)
    trained = Model(tuple(layout.sizes), summary.params, dataset=data.name,
                    image_shape=tuple(data.image_shape), num_classes=data.num_classes,
                    mean=data.mean, std=data.std, projection=summary.projection)
    return Result(summary.test_accuracy, summary.history, trained, _as_ran(cfg, plan), summary.best_accuracy,
                  dict(summary.extra))


def _as_ran(cfg: Config, plan: DpPlan | None) -> Config:
    """The settings as they ran: with --dp-epsilon, the noise it calibrated (and a resume's
    recalibration) in dp_noise / dp_pca_noise, marked derived."""
    if plan is None or cfg.dp_noise is not None:
        return cfg
    noise: dict[str, Any] = {"dp_noise": plan.z}
    if plan.pca and cfg.dp_pca_noise is None:
        noise["dp_pca_noise"] = plan.pca_noise
    ran = dataclasses.replace(cfg, **noise)
    object.__setattr__(ran, "_derived", tuple(cfg._derived) + tuple(noise))
    return ran


def _settle(cfg: Config, comm: Comm, report_result: bool) -> tuple[Config, testing.Hooks]:
    """The settings validated (the same on every rank), logging, the launch checked, the tests'
    hooks (runtime/testing.py), BLAS threads. Overflow in a diverging run would warn on every
    rank: the trainers check the (reduced) loss for NaN/Inf every step and stop with one message
    naming the step instead."""
    import numpy as np

    computed_alike(lambda: config_mod.validate(cfg, comm.size))
    comm.agree_all(lambda: log.configure(comm.rank, cfg.log_level, quiet=cfg.quiet,
                                         show_result=report_result, log_file=cfg.log_file))
    if comm.is_world():
        check_launch(comm.size)
    hooks = comm.agree_all(lambda: testing.hooks_for(comm.rank))
    cfg = _threads(cfg, comm)
    np.seterr(over="ignore", invalid="ignore", divide="ignore")
    return cfg, hooks


def _threads(cfg: Config, comm: Comm) -> Config:
    """--threads above the cores this rank may run on only oversubscribes: cap it, say so once."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    cores = comm.allreduce(cores, "min")
    if cfg.threads > cores:
        if comm.rank == 0:
            logger.warning(f"--threads {cfg.threads} is more than the {cores} core"
                           f"{'s' if cores > 1 else ''} a rank may use here: using {cores}")
        cfg = cfg.replace(threads=cores)
    _warn_oversubscribed(cfg.threads, comm)
    backends.set_threads(cfg.threads)
    return cfg


def _warn_oversubscribed(threads: int, comm: Comm) -> None:
    """One warning when a node runs more ranks x threads than it has cores: they take turns on
    the cores, and the job is slower, not faster (4 ranks on 2 cores: 3x the time of 2)."""
    node = comm.node_comm()
    try:
        try:
            mine = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            mine = list(range(os.cpu_count() or 1))
        cores = len(set().union(*node.allgather(mine)))
        load = (node.size * threads, cores, host_name()) if node.rank == 0 else None
    finally:
        node.Free()
    worst = max((x for x in comm.allgather(load) if x is not None), key=lambda x: x[0] / x[1])
    if comm.rank == 0 and worst[0] > worst[1]:
        per = f"{worst[0]} ranks" if threads == 1 else f"{worst[0] // threads} ranks x {threads} threads"
        logger.warning(f"{per} on {worst[2]}, which has {worst[1]} core{'s' if worst[1] > 1 else ''} for them: "
                       f"they share the cores, so the run takes longer, not less; use at most {worst[1]} "
                       f"rank{'s' if worst[1] > 1 else ''} x threads per node (nproc)")


def _machine(cfg: Config, comm: Comm) -> tuple[Config, Backend]:
    """One backend for the whole job (the settings checked again with it resolved), and on a
    GPU one device per rank of a node, by node-local rank."""
    cfg, backend = resolve_backend(cfg, comm)
    computed_alike(lambda: config_mod.check_backend(cfg))
    if cfg.backend == "cupy":
        from .parallel.launch import local_rank

        where = local_rank(comm)
        comm.agree_all(lambda: backend.select_device(where))    # type: ignore[attr-defined]
    return cfg, backend


def resolve_backend(cfg: Config, comm: Comm) -> tuple[Config, Backend]:
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
            logger.warning(f"--backend auto: using {name} on every rank ({', '.join(map(str, ranks))} "
                           f"of {comm.size} could use another backend, but not every rank can)")
    else:
        name = cfg.backend

    def load() -> Backend:
        try:
            return backends.get(name)
        except (backends.BackendUnavailable, ImportError) as exc:
            raise UsageError(str(exc)) from None

    backend = comm.agree_all(load)
    return cfg.replace(backend=name), backend


def _check_outputs(cfg: Config, comm: Comm) -> None:
    """Fail before training, not after it, when an output cannot be written."""
    from .io.files import check_writable_dir

    def check() -> None:
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
                    raise UsageError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from None

    comm.agree(check)


def _check_not_replacing(cfg: Config, comm: Comm) -> None:
    """A run never replaces an earlier run's metrics, model or TensorBoard events: refused by name
    unless --overwrite (or --resume, which continues that run)."""
    if cfg.overwrite or cfg.resume:
        return

    def check() -> None:
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


def load_dataset(name: str = "mnist", data_dir: str | None = None, *, comm: Any = None,
                 fetch: bool = True) -> data_mod.Dataset:
    """The data set `name` (hpcfl.data.CATALOGUE, or 'idx' / 'npz' with data_dir), ready to
    read: rank 0 fetches it if missing (catalogue sets), validates it and prepares or verifies
    the cache; then every rank opens the cache (memory-mapped) and all ranks agree that they
    could."""
    comm = _as_comm(comm)
    spec = computed_alike(lambda: catalogue.get(name))
    source = computed_alike(lambda: data_mod.resolve_data_dir(data_dir, name))

    def prepare() -> str:  # rank 0 only; the others wait
        if fetch and data_mod.missing_files(source, spec) and spec.format == "idx" and (spec.urls or spec.archive):
            data_mod.fetch(source, spec=spec)
        return str(data_mod.prepare_cache(source, spec=spec))

    path = comm.agree(prepare)
    return comm.agree_all(lambda: data_mod.open_cache(path))


def _data(cfg: Config, comm: Comm) -> tuple[data_mod.Dataset, Layout]:
    """The data set, the model's layout (its input and output sizes follow the data) and the
    memory plan."""
    from .core import layout as model_layout

    data = load_dataset(cfg.dataset, cfg.data_dir, comm=comm)
    inputs = config_mod.pca_directions(cfg) or data.input_size
    if inputs > data.input_size:
        raise UsageError(f"--dp-pca {cfg.dp_pca}: more directions than the {data.input_size} values of "
                         f"a {data.name} image", collective=True)
    layout = model_layout.layout(cfg.hidden, inputs, data.num_classes)
    _check_memory(cfg, comm, layout, data)
    return data, layout


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


def _memory_plan(cfg: Config, comm: Comm, layout: Layout, data: data_mod.Dataset) -> tuple[str, dict[str, int]]:
    """(the batch option, the bytes of buffers per rank by what they grow with)."""
    from .core import replica

    if cfg.mode == "dp":
        rows = math.ceil(cfg.batch_size / comm.size)
        return "--batch-size", replica.buffer_bytes(cfg, layout, rows)
    import numpy as np

    from .fl import partition
    from .training import federated

    parts = computed_alike(lambda: partition.create(cfg.partition, np.asarray(data.train_y), cfg.num_clients,
                                                 cfg.seed, cfg.alpha))
    sizes = np.array([len(p) for p in parts])
    plan = replica.buffer_bytes(cfg.replace(optimizer="sgd"), layout, federated.max_local_batch(cfg, sizes))
    plan["model"] += federated.buffer_bytes(cfg, layout, comm.rank == 0, comm.size // cfg.ranks_per_client)
    return "--local-batch-size", plan


def _check_memory(cfg: Config, comm: Comm, layout: Layout, data: data_mod.Dataset) -> None:
    """Refuse a plan whose preallocated buffers cannot fit, before allocating them (a 95 GiB
    MemoryError printed by every rank otherwise), naming the option that makes it big."""
    node = comm.node_comm()
    local = node.size
    node.Free()
    batch_opt, plan = _memory_plan(cfg, comm, layout, data)
    need = sum(plan.values())
    avail = _available_memory()

    def check() -> None:
        if avail is not None and need * local > avail:
            what = batch_opt if plan["batch"] > plan["model"] else "--hidden"
            raise UsageError(f"{what}: this run needs {need / 2**30:.1f} GiB of buffers per rank "
                             f"(model {plan['model'] / 2**30:.2f} GiB, batch {plan['batch'] / 2**30:.2f} GiB) "
                             f"x {local} rank{'s' if local > 1 else ''} on this node, but only "
                             f"{avail / 2**30:.1f} GiB are available: reduce {what}")

    comm.agree_all(check)


@contextlib.contextmanager
def _locks(cfg: Config, comm: Comm) -> Iterator[None]:
    """One run per output path for the duration of the block (rank 0 holds the locks)."""
    lock = RunLock()

    def take_locks() -> None:
        for what, path, is_dir in (("--checkpoint-dir", cfg.checkpoint_dir, True),
                                   ("--out", cfg.out, True), ("--metrics", cfg.metrics, False)):
            if path:
                lock.acquire(what, path, is_dir)

    try:
        comm.agree(take_locks)
    except HpcflError:
        lock.release()
        raise
    try:
        yield
    finally:
        if comm.rank == 0:
            lock.release()


def _run_trainer(cfg: Config, comm: Comm, data: data_mod.Dataset, backend: Backend, reporter: Reporter,
                 layout: Layout, plan: DpPlan | None, hooks: testing.Hooks) -> Summary:
    """The trainer of cfg.mode, under the stall watchdog; the final accuracy reported."""
    made = config_mod.derived(cfg)
    if made:
        reporter.info("derived settings: " + ", ".join(f"{config_mod.flag(n)} {config_mod.value_text(v)}"
                                                      for n, v in made.items()))
    try:
        hooks.at_step(comm.rank, 0, [])        # step 0 is start-up
        timeout = cfg.stall_timeout if comm.size > 1 else 0
        with Watchdog(timeout, comm.rank, host_name(), comm.Abort):
            if cfg.mode == "dp":
                from .training.dataparallel import train as trainer
            else:
                from .training.federated import train as trainer
            summary = trainer(cfg, comm, data, backend, reporter, layout, plan, hooks)
    finally:
        reporter.close()
    if summary.test_accuracy is not None:
        reporter.result(f"final test accuracy {100 * summary.test_accuracy:.2f}%")
    return summary
