"""Helpers shared by the benchmark scripts: launching workers, parsing their results, CSV files,
machine details. No MPI and no hpcfl import here (the orchestrator stays light)."""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULT_TAG = "RESULT "           # a worker's answer: one line "RESULT {json}" on stdout

# The model and run of issue 4: 784-256-128-10, batch 128, 60,000 samples, SGD momentum 0.9
SIZES = (784, 256, 128, 10)
BATCH = 128
N_TRAIN = 60_000
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4


def n_params(sizes=SIZES) -> int:
    return sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))


def flops_per_sample(sizes=SIZES) -> int:
    """As hpcfl.core.layout.Layout.flops_per_sample: 3 forward, 3 weight-gradient, 2 input-gradient GEMMs."""
    macs = [i * o for i, o in zip(sizes[:-1], sizes[1:])]
    return 2 * (2 * sum(macs) + sum(macs[1:]))


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mpirun() -> str:
    """The mpirun next to this Python (the mpich wheel's) if there is one, else the PATH's."""
    local = Path(sys.executable).with_name("mpirun")
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


def worker_env(extra: dict | None = None) -> dict:
    """One BLAS/OpenMP thread everywhere, the repository importable, unbuffered output."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    env.update(extra or {})
    return env


class WorkerError(RuntimeError):
    pass


def run(cmd: list[str], env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=worker_env(env), cwd=cwd or ROOT)
    if proc.returncode != 0:
        raise WorkerError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_worker(cmd: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    """Run a worker and return the JSON of its RESULT line."""
    proc = run(cmd, env, timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise WorkerError(f"{' '.join(map(str, cmd))}: no result line\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def emit(result: dict) -> None:
    """Called by a worker (rank 0 only) to hand its result to run_all."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write_csv(path: Path, rows: list[dict]) -> None:
    path = Path(path)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: Path) -> list[dict]:
    """Rows with numbers converted back to int/float where they parse."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(v):
    if v is None or v == "":
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        return f"{time.strftime('%Y-%m-%d %H:%M:%S')} load average {load}"
    except OSError:
        return time.strftime("%Y-%m-%d %H:%M:%S")


def machine_info() -> dict:
    """What RESULTS.md names: CPU model and cores, memory, software versions."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
            "cores": cores(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("Model name", "?")
        info["cpu_flags_avx512"] = "avx512f" in fields.get("Flags", "")
        info["hypervisor"] = fields.get("Hypervisor vendor", "none")
        info["l2_cache"] = fields.get("L2 cache", "?")
    except OSError:
        info["cpu_model"] = platform.processor() or "?"
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    from importlib import metadata

    for mod in ("numpy", "numba", "mpi4py", "mpich", "torch", "matplotlib"):
        try:
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            info[mod] = "absent"
    try:
        info["mpi"] = " ".join(run([sys.executable, "-c", "from mpi4py import MPI; "
                           "print(MPI.Get_library_version().strip().splitlines()[0])"]).stdout.split())
    except Exception:
        info["mpi"] = "?"
    info["commit"] = code_version()
    return info


def code_version() -> str:
    """The commit of the code measured, "+changes" when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "hpcfl",
                                "benchmarks/*.py"], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+changes" if dirty else "")


def write_section(path: Path, heading: str, text: str) -> None:
    """Put `text` in place of the file's section `heading` (a "## " line, up to the next "## "),
    or append it; a new file gets a title first. Other sections stay as they are."""
    old = path.read_text() if path.exists() else "# Differential privacy in hpcfl: measured\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new.rstrip("\n") + "\n")


def write_marked(path: Path, begin: str, end: str, text: str) -> None:
    """Put `text` (which starts with the `begin` marker line and ends with the `end` one) in place
    of the file's part between those markers, or append it; the rest of the file stays."""
    doc = path.read_text() if path.exists() else "# Privacy: measured\n"
    if begin in doc:
        head, rest = doc.split(begin, 1)
        doc = head + text + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `hpcfl: error` lines a failed run printed (one per job, by rank 0 or the failing rank)."""
    return [line for line in (proc.stderr + proc.stdout).splitlines() if "hpcfl: error" in line]


def hpcfl_job(ranks: int, args: list[str]) -> tuple[list[dict], dict, float, str | None]:
    """`mpirun -n RANKS python -m hpcfl ARGS --quiet --metrics --out` in a scratch folder; never
    raises for a failed run. Returns (the metrics records, config.json - what ran, defaults
    resolved -, wall seconds, None or why it failed)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        metrics, out = Path(tmp) / "m.jsonl", Path(tmp) / "out"
        cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", "hpcfl", *args,
               "--quiet", "--metrics", str(metrics), "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), cwd=ROOT)
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    failed = None
    if proc.returncode != 0 or not recs:
        failed = (error_lines(proc) or [f"failed (exit {proc.returncode})"])[0]
    return recs, config, wall, failed


def shown_settings(config: dict, names) -> dict:
    """The settings `names` that a run's config.json recorded, lists joined as on the command line."""
    settings = config.get("settings", config)
    return {name: ",".join(map(str, settings[name])) if isinstance(settings[name], list) else settings[name]
            for name in names if name in settings}
