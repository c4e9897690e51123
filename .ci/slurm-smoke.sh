#!/usr/bin/env bash
# Smoke test for the cluster brought up by .ci/slurm-up.sh.
#   PYTHON=/path/to/python .ci/slurm-smoke.sh     (default PYTHON=python3; needs mpi4py)
# Checks: MPI over `srun --mpi=pmi2` (2 ranks), `sbatch --wait`, `srun --overcommit -n 4`.
set -euo pipefail
PYTHON=${PYTHON:-python3}
T=${SLURM_SMOKE_TIMEOUT:-120}   # per-check timeout (s)
log() { printf '[slurm-smoke] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

# srun/sbatch need a working directory that exists on the (only) node; use a private tmp dir.
work=$(mktemp -d "${TMPDIR:-/tmp}/slurm-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

PYBIN=$(command -v "$PYTHON") || fail "python '$PYTHON' not found"

# 1. MPI ranks via PMI2
log "srun -n 2 --mpi=pmi2 $PYBIN (mpi4py)"
out=$(timeout "$T" srun -n 2 --mpi=pmi2 "$PYBIN" -c \
    'from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size, c.allreduce(1))') \
    || fail "srun mpi4py failed (rc=$?); does $PYBIN have mpi4py + an MPI (e.g. the mpich wheel)? set PYTHON=..."
got=$(printf '%s\n' "$out" | sort)
[[ $got == $'0 2 2\n1 2 2' ]] || fail "unexpected mpi4py output: $out"
log "ok: $(printf '%s' "$out" | tr '\n' ';')"

# 2. sbatch --wait writes a file
log "sbatch --wait"
cat > job.sh <<'JOB'
#!/bin/bash
#SBATCH -J smoke -n 1 -t 5 -o smoke-%j.out
echo "hello from $SLURM_JOB_ID on $(hostname)" > "$SLURM_SUBMIT_DIR/sbatch-ok.txt"
JOB
timeout "$T" sbatch --wait job.sh >/dev/null || fail "sbatch --wait failed (rc=$?)"
[[ -s sbatch-ok.txt ]] || fail "sbatch job did not write its file"
log "ok: $(cat sbatch-ok.txt)"

# 3. more tasks than CPUs
log "srun --overcommit -n 4"
n=$(timeout "$T" srun --overcommit -n 4 hostname | wc -l) || fail "srun --overcommit failed"
[[ $n == 4 ]] || fail "expected 4 tasks, got $n"
log "ok: 4 tasks"

log "all smoke checks passed"
