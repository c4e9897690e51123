"""Run every benchmark of issue 4 and write CSVs, PNG plots and benchmarks/RESULTS.md:

    python benchmarks/run_all.py --out benchmarks/results            # the full suite (~10 min on 2 cores)
    python benchmarks/run_all.py --out /tmp/smoke --quick             # a 1-2 minute smoke version
    python benchmarks/run_all.py --max-ranks 8                        # scaling runs up to 8 ranks

Everything runs one thread per rank. Timings that are compared are taken side by side in the
same run and interleaved round by round (so a slow minute of a shared machine hits every
variant alike); RESULTS.md reports medians over the rounds. Set HPCFL_DATA_DIR to the MNIST
folder first. Sections (--only picks some): capacity single parallel sync osu scaling startup
memory profile compute fl; the scaling model, the plots and RESULTS.md are made from the CSVs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report
from common import BATCH, BENCH, WorkerError, cores, machine_info, mpirun, run, run_worker, uptime, write_csv
from secagg_cost import FLOWER_PYTHON, flower_python_ok, flower_rounds

PY = sys.executable
SECTIONS = report.ALL_SECTIONS


class Ctx:
    def __init__(self, args):
        self.args, self.out, self.quick = args, Path(args.out), args.quick
        self.repeats = args.repeats or (1 if args.quick else 5)
        self.epochs = 2 if args.quick else 3          # the first epoch of every run is warm-up
        self.max_ranks = args.max_ranks
        self.have_torch = importlib.util.find_spec("torch") is not None
        self.notes: list[str] = []

    def log(self, msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hpcfl_run(ctx, ranks: int, args: list, env=None, timeout=900) -> list[dict]:
    """`mpirun -n ranks python -m hpcfl ARGS --metrics TMP --quiet`; returns the metrics records."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        run([mpirun(), "-n", ranks, PY, "-m", "hpcfl", *args, "--metrics", metrics, "--quiet"],
            env=env, timeout=timeout)
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def ranks_list(max_ranks: int) -> list[int]:
    out = [1 << k for k in range(12) if (1 << k) <= max_ranks]
    return out + ([max_ranks] if max_ranks not in out else [])


# ------------------------------------------------------------------ sections

def sec_capacity(ctx):
    """How many cores this run really had: one GEMM loop alone, then two at once (ideal: 2.0x)."""
    import subprocess

    from common import worker_env

    cmd = [PY, str(BENCH / "single.py"), "floor", "--epochs", "1"]

    def once(k):
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_env())
                 for _ in range(k)]
        outs = [p.communicate() for p in procs]
        times = [json.loads(o[0].decode().split("RESULT ", 1)[1])["epoch_seconds"][0] for o in outs]
        return time.perf_counter() - t0, times

    _, alone = once(1)
    _, pair = once(2)
    rows = [{"processes": 1, "gemm_epoch_seconds": alone[0]},
            {"processes": 2, "gemm_epoch_seconds": max(pair)}]
    throughput = 2 * alone[0] / max(pair)
    rows.append({"processes": "throughput_2_vs_1", "gemm_epoch_seconds": throughput})
    write_csv(ctx.out / "capacity.csv", rows)
    ctx.log(f"capacity: two concurrent GEMM loops give {throughput:.2f}x the throughput of one (ideal 2.00)")


def sec_single(ctx):
    """Target 1: hpcfl vs the BLAS floor, a plain NumPy loop and PyTorch; 1 rank, 1 thread."""
    variants = ["floor", "hpcfl-numba", "hpcfl-numpy", "numpy-loop"] + (["torch"] if ctx.have_torch else [])
    if not ctx.have_torch:
        ctx.notes.append("PyTorch is not installed: the PyTorch and DDP comparisons were skipped.")
    rows, shapes = [], None
    for r in range(ctx.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]   # rotate the order
        for v in order:
            ctx.log(f"single round {r + 1}/{ctx.repeats}: {v}")
            if v.startswith("hpcfl-"):
                recs = hpcfl_run(ctx, 1, ["--epochs", ctx.epochs, "--backend", v.split("-")[1],
                                          "--allreduce", "fused"])
                times = [rec["epoch_seconds"] for rec in recs]
            else:
                res = run_worker([PY, BENCH / "single.py", v, "--epochs", ctx.epochs])
                times = res["epoch_seconds"]
                shapes = res.get("shapes", shapes)
            for e, sec in enumerate(times):
                rows.append({"round": r + 1, "variant": v, "epoch": e + 1, "epoch_seconds": sec,
                             "warmup": int(e == 0)})
    write_csv(ctx.out / "single.csv", rows)
    if shapes:
        write_csv(ctx.out / "gemm_shapes.csv", shapes)


def sec_parallel(ctx):
    """Targets 2 and 6: 1 vs 2 ranks, fused vs overlapped allreduce (with and without MPICH's
    progress thread), and PyTorch DDP (gloo) at 2 ranks; global batch 128 everywhere."""
    configs = [("hpcfl", 1, "fused", 0), ("hpcfl", 1, "overlap", 0), ("hpcfl", 2, "fused", 0),
               ("hpcfl", 2, "overlap", 0), ("hpcfl", 2, "overlap", 1)]
    if ctx.have_torch:
        configs.append(("torch-ddp", 2, "ddp", 0))
    rows = []
    for r in range(ctx.repeats):
        for impl, ranks, mode, async_progress in configs:
            if async_progress and (r >= 2 or ctx.quick):   # ~10x slower on 2 cores: two rounds suffice
                continue
            label = (f"{impl} {ranks} rank{'s' if ranks > 1 else ''} {mode}"
                     + (" +async progress" if async_progress else ""))
            ctx.log(f"parallel round {r + 1}/{ctx.repeats}: {label}")
            if impl == "torch-ddp":
                times = run_worker([PY, BENCH / "ddp.py", "--ranks", ranks, "--epochs", ctx.epochs],
                                   timeout=900)["epoch_seconds"]
            else:
                env = {"MPIR_CVAR_ASYNC_PROGRESS": "1"} if async_progress else None
                recs = hpcfl_run(ctx, ranks, ["--epochs", 2 if async_progress else ctx.epochs,
                                              "--backend", "numba", "--allreduce", mode], env=env)
                times = [rec["epoch_seconds"] for rec in recs]
            for e, sec in enumerate(times):
                rows.append({"round": r + 1, "config": label, "impl": impl, "ranks": ranks,
                             "allreduce": mode, "async_progress": async_progress, "epoch": e + 1,
                             "epoch_seconds": sec, "warmup": int(e == 0)})
    write_csv(ctx.out / "parallel.csv", rows)


def sec_sync(ctx):
    """Target 3: gradient sync per step in training vs a bare Allreduce of the same buffer."""
    rows = []
    for r in range(max(1, ctx.repeats // 2)):
        for mode in ("fused", "overlap"):
            ctx.log(f"sync round {r + 1}: 2 ranks, {mode}")
            res = run_worker([mpirun(), "-n", 2, PY, BENCH / "mpi_tasks.py", "sync", "--allreduce", mode,
                              "--epochs", ctx.epochs])
            rows.append({"round": r + 1, "ranks": 2, "allreduce": mode, "floats": res["floats"],
                         "sync_us": res["sync"]["min_over_ranks_median_us"],
                         "sync_incl_wait_us": res["sync"]["mean_over_ranks_median_us"],
                         "bare_us": res["bare"]["min_over_ranks_median_us"],
                         "bare_incl_wait_us": res["bare"]["mean_over_ranks_median_us"],
                         "bare_with_compute_us": res["bare_with_compute"]["min_over_ranks_median_us"],
                         "ratio": res["ratio"], "start_us": res.get("start_us"),
                         "epoch_seconds": res["epoch_seconds"][-1]})
    write_csv(ctx.out / "sync.csv", rows)


def sec_osu(ctx):
    """Allreduce latency and bandwidth over 4 B..4 MiB at 2..max ranks (OSU style)."""
    rows, p2p = [], []
    for ranks in [p for p in ranks_list(max(2, ctx.max_ranks)) if p >= 2]:
        ctx.log(f"osu allreduce: {ranks} ranks")
        res = run_worker([mpirun(), "-n", ranks, PY, BENCH / "mpi_tasks.py", "osu",
                          "--budget", 0.03 if ctx.quick else 0.2])
        for row in res["rows"]:
            rows.append({"ranks": ranks, "oversubscribed": int(ranks > cores()), **row})
        p2p.append({"ranks": ranks, "p2p_GBps": res["p2p_GBps"], "memcpy_GBps": res["memcpy_GBps"]})
    write_csv(ctx.out / "allreduce.csv", rows)
    write_csv(ctx.out / "p2p.csv", p2p)


def sec_scaling(ctx):
    """Strong (global batch 128) and weak (128 per rank) scaling of dp, and of fl, over 1..N ranks."""
    rows = []
    for r in range(max(1, ctx.repeats // 2)):
        for ranks in ranks_list(ctx.max_ranks):
            for kind in ("strong", "weak"):
                B = BATCH if kind == "strong" else BATCH * ranks
                ctx.log(f"scaling round {r + 1}: dp {kind} {ranks} ranks (global batch {B})")
                recs = hpcfl_run(ctx, ranks, ["--epochs", ctx.epochs, "--backend", "numba", "--batch-size", B])
                for rec in recs[1:]:
                    rows.append({"round": r + 1, "mode": "dp", "kind": kind, "ranks": ranks, "global_batch": B,
                                 "seconds": rec["epoch_seconds"], "samples_per_second": rec["samples_per_second"],
                                 "oversubscribed": int(ranks > cores())})
                # fl: 64 IID clients, E=1, B=10; strong: 16 (quick: 8) clients per round in all;
                # weak: 4 (quick: 2) clients per rank and round
                per_rank = 2 if ctx.quick else 4
                clients = (per_rank * 4) if kind == "strong" else per_rank * ranks
                ctx.log(f"scaling round {r + 1}: fl {kind} {ranks} ranks ({clients} clients per round)")
                recs = hpcfl_run(ctx, ranks, ["--mode", "fl", "--backend", "numba", "--num-clients", 64,
                                              "--client-fraction", min(1.0, clients / 64), "--local-epochs", 1,
                                              "--local-batch-size", 10, "--rounds", ctx.epochs,
                                              "--eval-every", 1000])
                for rec in recs[1:]:
                    rows.append({"round": r + 1, "mode": "fl", "kind": kind, "ranks": ranks,
                                 "clients_per_round": clients, "seconds": rec["round_seconds"],
                                 "samples_per_second": rec["samples_per_second"],
                                 "oversubscribed": int(ranks > cores())})
    write_csv(ctx.out / "scaling.csv", rows)


def probe_run(ctx, ranks, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t_launch = time.time()
        run([mpirun(), "-n", ranks, PY, BENCH / "probe.py", tmp, *args, "--quiet"], timeout=900)
        t_done = time.time()
        recs = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("probe-*.json"))]
    for rec in recs:
        rec["t_launch"], rec["t_done"] = t_launch, t_done
    return recs


def sec_startup(ctx):
    """Target 4: launch to first step at 8 ranks (warm numba cache: one untimed run first)."""
    ranks = 8
    probe_run(ctx, ranks, ["--max-steps", 1, "--backend", "numba"])           # warms the caches
    rows = []
    for r in range(1 if ctx.quick else max(3, ctx.repeats)):
        ctx.log(f"startup round {r + 1}: {ranks} ranks")
        recs = probe_run(ctx, ranks, ["--max-steps", 1, "--backend", "numba"])
        t0 = recs[0]["t_launch"]
        rows.append({"round": r + 1, "ranks": ranks,
                     "python_up_s": max(x["t_python"] for x in recs) - t0,
                     "first_step_start_s": max(x["t_first_step_start"] for x in recs) - t0,
                     "first_step_end_s": max(x["t_first_step_end"] for x in recs) - t0,
                     "exit_s": recs[0]["t_done"] - t0})
    write_csv(ctx.out / "startup.csv", rows)
    # one process alone: where its start-up goes (python -X importtime, and the probe's clocks)
    with tempfile.TemporaryDirectory() as tmp:
        t_launch = time.time()
        proc = run([PY, "-X", "importtime", BENCH / "probe.py", tmp, "--max-steps", 1, "--backend", "numba",
                    "--quiet"])
        rec = json.loads(next(Path(tmp).glob("probe-*.json")).read_text())
    imports = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if name.startswith(" ") and not name.startswith("  ") and cumulative.strip().isdigit():
                imports.append({"module": name.strip(), "cumulative_ms": int(cumulative) / 1000})
    imports = sorted((r for r in imports if r["cumulative_ms"] >= 2), key=lambda r: -r["cumulative_ms"])
    phases = [{"module": "[interpreter up]", "cumulative_ms": 1000 * (rec["t_python"] - t_launch)},
              {"module": "[probe start -> first step starts]", "cumulative_ms":
               1000 * (rec["t_first_step_start"] - rec["t_python"])},
              {"module": "[first step: loads the cached Numba kernels]", "cumulative_ms":
               1000 * (rec["t_first_step_end"] - rec["t_first_step_start"])}]
    write_csv(ctx.out / "startup_profile.csv", phases + imports)


FL_PAPER = ["--mode", "fl", "--hidden", "200,200", "--num-clients", 100, "--client-fraction", 0.1,
            "--local-epochs", 1, "--local-batch-size", 10, "--local-lr", 0.1, "--eval-every", 1000]
FL_TIMELINE = [  # (phase, the probe's clock that ends it): max over the ranks, from mpirun's launch
    ("interpreter up", "t_python"), ("imports, MPI_Init", "t_mpi"), ("backend (Numba import)", "t_backend"),
    ("checks, data set opened", "t_data"), ("federation built", "t_federation")]


def sec_fl(ctx):
    """FL's small steps (issue 15): 20 rounds of the FedAvg paper's 2NN setting at 2 ranks, the
    whole job (mpirun's launch to its exit) against Flower 1.42's FedAvg in the same setting
    (benchmarks/flower_secagg.py, when --flower-python imports flwr), interleaved round by round;
    where hpcfl's job goes (probe.py's timeline); one rank's step against the GEMMs alone."""
    ranks, rounds = 2, 3 if ctx.quick else 20
    args = [*FL_PAPER, "--rounds", rounds]
    flower = ctx.args.flower_python if flower_python_ok(ctx.args.flower_python) else None
    if flower is None:
        ctx.notes.append(f"fl: Flower not run ({ctx.args.flower_python or 'no --flower-python'} does not import flwr)")
    hpcfl_run(ctx, ranks, args)                                 # warms the Numba cache
    walls, timeline, steps = [], [], []
    for r in range(1 if ctx.quick else max(3, ctx.repeats)):
        ctx.log(f"fl round {r + 1}: hpcfl {ranks} ranks x {rounds} rounds{', Flower' if flower else ''}")
        t0 = time.perf_counter()
        hpcfl_run(ctx, ranks, args)
        walls.append({"round": r + 1, "impl": "hpcfl", "wall_seconds": time.perf_counter() - t0, "rounds": rounds})
        if flower:
            _, wall = flower_rounds(flower, rounds, ["--secagg", "0"])
            walls.append({"round": r + 1, "impl": "Flower FedAvg", "wall_seconds": wall, "rounds": rounds})
        recs = probe_run(ctx, ranks, [str(a) for a in args])
        t_launch = recs[0]["t_launch"]
        row = {"round": r + 1, "exit_s": recs[0]["t_done"] - t_launch}
        for phase, key in FL_TIMELINE:
            row[phase] = max(x[key] for x in recs) - t_launch
        row["first round end"] = max(x["rounds"][0][1] for x in recs) - t_launch
        row["last round end"] = max(x["rounds"][-1][1] for x in recs) - t_launch
        row["final evaluation end"] = max(x["t_final_eval"][1] for x in recs) - t_launch
        later = [[x["rounds"][k] for x in recs] for k in range(1, len(recs[0]["rounds"]))]
        row["round_s_median"] = statistics.median(max(e for _, e, _ in k) - min(s for s, _, _ in k) for k in later)
        row["local_training_s_median"] = statistics.median(statistics.fmean(c for _, _, c in k) for k in later)
        row["first_round_s"] = max(x["rounds"][0][1] for x in recs) - min(x["rounds"][0][0] for x in recs)
        row["numba_load_s"] = statistics.fmean(x["numba_load_seconds"] for x in recs)
        timeline.append(row)
    res = run_worker([mpirun(), "-n", 1, PY, BENCH / "mpi_tasks.py", "onerank"] +
                     (["--blocks", 2, "--block-steps", 100] if ctx.quick else []))
    for r in res["rows"]:
        steps.append({k: v for k, v in r.items() if k != "per_block_us"})
    write_csv(ctx.out / "fl_wall.csv", walls)
    write_csv(ctx.out / "fl_timeline.csv", timeline)
    write_csv(ctx.out / "onerank.csv", steps)


def sec_memory(ctx):
    """Target 5: peak and resident memory per rank at 1..8 ranks after one epoch."""
    rows = []
    for ranks in ([1, 8] if ctx.quick else [1, 2, 4, 8]):
        ctx.log(f"memory: {ranks} ranks, one epoch")
        args = ["--max-steps", 60] if ctx.quick else ["--epochs", 1]
        for rec in probe_run(ctx, ranks, [*args, "--backend", "numba"]):
            st, img = rec.get("status_kib", {}), rec.get("train_images_kib", {})
            mib = 1 / 1024
            rows.append({"ranks": ranks, "rank": rec["rank"], "ru_maxrss_mib": rec["ru_maxrss_kib"] * mib,
                         "rss_mib": st.get("VmRSS", 0) * mib, "rss_anon_mib": st.get("RssAnon", 0) * mib,
                         "rss_file_mib": st.get("RssFile", 0) * mib, "pss_mib": st.get("Pss", 0) * mib,
                         "images_rss_mib": img.get("rss", 0) * mib, "images_pss_mib": img.get("pss", 0) * mib,
                         "images_mapped_mib": img.get("size", 0) * mib})
    write_csv(ctx.out / "memory.csv", rows)


def sec_profile(ctx):
    """Where the time of a step goes, at 1 and 2 ranks (global batch 128)."""
    rows, alloc = [], []
    for ranks in (1, 2):
        ctx.log(f"profile: {ranks} ranks")
        blocks = ["--blocks", 2, "--block-steps", 100] if ctx.quick else ["--blocks", 6, "--block-steps", 200]
        res = run_worker([mpirun(), "-n", ranks, PY, BENCH / "mpi_tasks.py", "profile", *blocks])
        for phase, us in res["phases_us"].items():
            rows.append({"ranks": ranks, "local_batch": res["local_batch"], "phase": phase, "us_per_step": us,
                         "share": us / res["step_us"]})
        rows.append({"ranks": ranks, "local_batch": res["local_batch"], "phase": "total", "us_per_step": res["step_us"],
                     "share": 1.0})
        alloc.append({"ranks": ranks, **res["alloc"]})
    write_csv(ctx.out / "profile.csv", rows)
    write_csv(ctx.out / "allocations.csv", alloc)


def sec_shm(ctx):
    """Node-aware reduction: fused vs overlap vs shm at 1 and 2 ranks, and 4 and 8 ranks
    oversubscribed on this machine's cores, global batch 128 and 1024 (interleaved rounds, the
    first epoch of every run is warm-up); then the per-step cost of gradient sync plus update
    (mpi_tasks.py profile --allreduce) and the private memory per node at 8 ranks."""
    rows = []
    rank_counts = [1, 2] + ([] if ctx.quick else [4, 8])
    for r in range(ctx.repeats if not ctx.quick else 1):
        for batch in (128, 1024):
            for ranks in rank_counts:
                for mode in ("fused", "overlap", "shm"):
                    ctx.log(f"shm round {r + 1}: batch {batch}, {ranks} ranks, {mode}")
                    epochs = ctx.epochs if ranks <= 2 else 2
                    recs = hpcfl_run(ctx, ranks, ["--epochs", epochs, "--batch-size", batch, "--backend", "numba",
                                                  "--allreduce", mode])
                    for e, rec in enumerate(recs):
                        rows.append({"round": r + 1, "batch": batch, "ranks": ranks, "allreduce": mode,
                                     "epoch": e + 1, "epoch_seconds": rec["epoch_seconds"], "warmup": int(e == 0)})
    write_csv(ctx.out / "shm.csv", rows)
    phases = []
    for ranks in (1, 2):
        for mode in ("fused", "shm"):
            ctx.log(f"shm profile: {ranks} ranks, {mode}")
            blocks = ["--blocks", 2, "--block-steps", 100] if ctx.quick else ["--blocks", 6, "--block-steps", 200]
            res = run_worker([mpirun(), "-n", ranks, PY, BENCH / "mpi_tasks.py", "profile", "--allreduce", mode,
                              *blocks])
            phases.append({"ranks": ranks, "allreduce": mode, "step_us": res["step_us"],
                           "sync_update_us": res["sync_update_us"],
                           **{f"{k}_us": v for k, v in res["phases_us"].items()}})
    write_csv(ctx.out / "shm_profile.csv", phases)
    mem = []
    for mode in ("fused", "shm"):
        ctx.log(f"shm memory: 8 ranks, {mode}")
        args = ["--max-steps", 60] if ctx.quick else ["--epochs", 1]
        for rec in probe_run(ctx, 8, [*args, "--backend", "numba", "--allreduce", mode]):
            st = rec.get("status_kib", {})
            mem.append({"allreduce": mode, "rank": rec["rank"], "rss_anon_mib": st.get("RssAnon", 0) / 1024,
                        "rss_shmem_mib": st.get("RssShmem", 0) / 1024, "pss_mib": st.get("Pss", 0) / 1024})
    write_csv(ctx.out / "shm_memory.csv", mem)


def sec_compute(ctx):
    """Step time at 1 rank for local batches 1..1024: the compute term of the scaling model."""
    ctx.log("compute: step time vs local batch")
    res = run_worker([mpirun(), "-n", 1, PY, BENCH / "mpi_tasks.py", "compute",
                      "--budget", 0.03 if ctx.quick else 0.15])
    write_csv(ctx.out / "compute.csv", res["rows"])


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results"), help="folder for the CSVs and PNGs")
    p.add_argument("--quick", action="store_true", help="a 1-2 minute smoke version (1 round, short runs)")
    p.add_argument("--max-ranks", type=int, default=cores(), help="largest rank count of the scaling runs")
    p.add_argument("--repeats", type=int, default=None, help="rounds of the interleaved timings (default 5, quick 1)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections "
                   "(the others' CSVs already in --out are kept and reported)")
    p.add_argument("--flower-python", default=FLOWER_PYTHON if Path(FLOWER_PYTHON).exists() else None,
                   help="the Python of an environment with flwr[simulation] for the fl section's Flower run "
                        "(see benchmarks/flower_secagg.py)")
    p.add_argument("--results-md", default=None,
                   help="where to write the report (default: benchmarks/RESULTS.md for the default "
                        "--out, else OUT/RESULTS.md, so a smoke run never overwrites the real one)")
    args = p.parse_args(argv)
    if args.results_md is None:
        default_out = Path(args.out).resolve() == (BENCH / "results").resolve()
        args.results_md = str(BENCH / "RESULTS.md" if default_out else Path(args.out) / "RESULTS.md")
    ctx = Ctx(args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {"command": command.strip(), "quick": args.quick, "repeats": ctx.repeats, "epochs_per_run": ctx.epochs,
            "max_ranks": args.max_ranks, "load_before": uptime(), **machine_info()}
    ctx.log(f"machine: {info.get('cpu_model')}, {info['cores']} cores; {info['load_before']}")
    failed = []
    t_start = time.time()
    for name in args.only or SECTIONS:
        try:
            globals()[f"sec_{name}"](ctx)
        except (WorkerError, OSError, KeyError, ValueError, IndexError) as exc:
            failed.append(name)
            ctx.notes.append(f"section {name} failed: {str(exc).splitlines()[0]}")
            traceback.print_exc()
    info.update(load_after=uptime(), wall_seconds=time.time() - t_start, notes=ctx.notes, failed=failed,
                sections=args.only or SECTIONS)
    previous = ctx.out / "run_info.json"
    # which run measured each section: a partial re-run (--only) replaces its own sections only
    this_run = {k: info.get(k) for k in report.RUN_KEYS}
    runs = dict.fromkeys(info["sections"], this_run)
    if args.only and previous.exists():
        prev = json.loads(previous.read_text())
        runs = {**report.runs_by_section(prev), **runs}
    info["runs_by_section"] = runs
    (ctx.out / "run_info.json").write_text(json.dumps(info, indent=2))
    report.build(ctx.out, Path(args.results_md))
    ctx.log(f"done in {time.time() - t_start:.0f} s; wrote {ctx.out} and {args.results_md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
