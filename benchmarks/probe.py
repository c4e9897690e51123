"""`python -m hpcfl` with two probes, for the start-up and memory benchmarks:

    mpirun -n 8 python benchmarks/probe.py OUTDIR --max-steps 1 --quiet

runs hpcfl's command line unchanged (the same imports, the same code path) and, on every rank,
writes OUTDIR/probe-RANK.json at exit with
  - t_python: wall-clock time when this script's first line ran (the interpreter is up),
  - t_first_step_start / t_first_step_end: around the first optimizer step (Replica.step),
  - ru_maxrss (peak resident memory, at exit), and right after training the resident and
    proportional memory split into anonymous (private) and file-backed, plus the resident and
    proportional size of the memory-mapped training images (from /proc/self/smaps);
  - in fl mode (the FL start-up profile, run_all.py's fl section) the clock times t_mpi (MPI_Init
    done: mpi4py imported), t_backend (the backend module loaded: Numba imported), t_data (the
    data set open), t_federation (fl.Federation built), rounds ([start, end, seconds of local
    training in that round] per round), t_final_eval (start, end) and numba_load_seconds (time
    inside Numba's dispatcher loading the cached kernels, at their first calls).
"""
import time

T_PYTHON = time.time()

import atexit
import json
import os
import resource
import sys

OUT = sys.argv[1]
ARGV = sys.argv[2:]
RANK = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
state = {}


def _status() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])          # KiB
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _mapping(suffix: str) -> dict:
    """Rss and Pss (KiB) of the mappings of files whose path ends with `suffix`."""
    rss = pss = size = 0
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):   # a mapping header line
                    inside = line.rstrip().endswith(suffix)
                elif inside:
                    k, _, v = line.partition(":")
                    if k == "Rss":
                        rss += int(v.split()[0])
                    elif k == "Pss":
                        pss += int(v.split()[0])
                    elif k == "Size":
                        size += int(v.split()[0])
    except OSError:
        pass
    return {"size": size, "rss": rss, "pss": pss}


def _report():
    rec = {"rank": int(RANK), "t_python": T_PYTHON, **state,
           "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    with open(os.path.join(OUT, f"probe-{RANK}.json"), "w") as f:
        json.dump(rec, f)


def _wrap_step():
    from hpcfl.training import dataparallel as dp

    step = dp.Replica.step

    def timed_step(self, *args, **kwargs):
        if "t_first_step_start" in state:
            return step(self, *args, **kwargs)
        state["t_first_step_start"] = time.time()
        try:
            return step(self, *args, **kwargs)
        finally:
            state["t_first_step_end"] = time.time()

    dp.Replica.step = timed_step
    params = dp.DataParallel.params

    def params_then_measure(self):
        # the run's last step is done, the data still mapped and the replica (with an shm
        # window) alive: memory now
        state["status_kib"] = _status()
        state["train_images_kib"] = _mapping("train_x.npy")
        return params(self)

    dp.DataParallel.params = params_then_measure


def _after(module, name, key):
    """Record time.time() in state[key] when module.name first returns."""
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        state.setdefault(key, time.time())
        return out
    setattr(module, name, wrapper)


def _wrap_fl():
    from hpcfl import api, backends
    from hpcfl.parallel import comm
    from hpcfl.training import federated as fl

    _after(comm, "_MPI", "t_mpi")
    get = backends.get

    def get_then_time_numba(*args, **kwargs):
        out = get(*args, **kwargs)
        if "t_backend" not in state:
            state["t_backend"] = time.time()
            _time_numba_loads()                      # numba is imported now: no change to start-up
        return out
    backends.get = get_then_time_numba
    _after(api, "load_dataset", "t_data")
    _after(fl.Federation, "__init__", "t_federation")
    rounds, local = state.setdefault("rounds", []), [0.0]
    round_fn, client_fn, evaluate = fl.Federation.round, fl.client_update, fl.Federation.evaluate

    def timed_round(self, *args, **kwargs):
        local[0], t0 = 0.0, time.time()
        try:
            return round_fn(self, *args, **kwargs)
        finally:
            rounds.append([t0, time.time(), local[0]])

    def timed_client(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return client_fn(*args, **kwargs)
        finally:
            local[0] += time.perf_counter() - t0

    def timed_evaluate(self, *args, **kwargs):
        t0 = time.time()
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            state["t_final_eval"] = [t0, time.time()]   # the last one is the final evaluation

    fl.Federation.round, fl.client_update, fl.Federation.evaluate = timed_round, timed_client, timed_evaluate


def _time_numba_loads():
    from numba.core import dispatcher

    compile_fn = dispatcher.Dispatcher._compile_for_args
    state["numba_load_seconds"] = 0.0

    def timed_compile(self, *args, **kwargs):      # a cache load at a kernel's first call
        t0 = time.perf_counter()
        try:
            return compile_fn(self, *args, **kwargs)
        finally:
            state["numba_load_seconds"] += time.perf_counter() - t0
    dispatcher.Dispatcher._compile_for_args = timed_compile


if __name__ == "__main__":
    atexit.register(_report)
    os.makedirs(OUT, exist_ok=True)
    _wrap_step()
    if "fl" in ARGV:
        _wrap_fl()
    from hpcfl.cli import main
    from hpcfl.parallel.comm import exit_process

    exit_process(main(ARGV))          # as hpcfl.cli.run (the atexit report runs inside)
