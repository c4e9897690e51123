"""Sanity check of the benchmark suite (not a test: timings are never asserted):

    python benchmarks/check_quick.py

runs `python benchmarks/run_all.py --quick` into a temporary folder and checks that it exits 0
and writes every CSV, every plot and a RESULTS.md with the targets table. Takes 2-3 minutes.
Needs the bench extra (matplotlib: pip install -e ".[bench]"). Targets that need what this
machine lacks (PyTorch, a GPU) are "not measured here", which is no failure; any other target
left unmeasured is.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSVS = ["capacity", "single", "gemm_shapes", "parallel", "sync", "allreduce", "p2p", "allreduce_model",
        "scaling", "scaling_model", "scaling_model_check", "startup", "memory", "profile", "allocations",
        "compute", "shm", "shm_profile", "shm_memory", "fl_wall", "fl_timeline", "onerank"]
PNGS = ["single", "parallel", "allreduce", "scaling", "scaling_model", "profile", "memory"]


def main() -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('check_quick: the benchmarks need matplotlib: pip install -e ".[bench]"', file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results"
        proc = subprocess.run([sys.executable, str(HERE / "run_all.py"), "--quick", "--out", str(out)])
        problems = [] if proc.returncode == 0 else [f"run_all.py --quick exited {proc.returncode}"]
        problems += [f"missing {n}.csv" for n in CSVS if not (out / f"{n}.csv").is_file()]
        problems += [f"missing {n}.png" for n in PNGS if not (out / f"{n}.png").is_file()]
        md = out / "RESULTS.md"
        text = md.read_text() if md.is_file() else ""
        if "| target | goal | measured | ratio | status |" not in text:
            problems.append("RESULTS.md has no targets table")
        if text.replace("not measured here", "").count("not measured"):
            problems.append("RESULTS.md has targets that were not measured")
        scaling = (out / "scaling.csv").read_text() if (out / "scaling.csv").is_file() else ""
        for mode in ("dp", "fl"):                    # every section's rows, not only its file
            if f",{mode}," not in scaling:
                problems.append(f"scaling.csv has no {mode} rows")
        if "skipped" in text:
            problems.append("RESULTS.md says a part was skipped")
    for p in problems:
        print(f"check_quick: {p}", file=sys.stderr)
    print("check_quick: " + ("FAILED" if problems else "ok: every CSV, plot and RESULTS.md written"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
