# Shared by the batch scripts in jobs/ (sourced, not run). See docs/clusters.md, and docs/reference.md,
# "Environment variables" and "Exit codes".
#
# Knobs, read from the environment (sbatch passes the submitting shell's environment on):
#   HPCFL_PYTHON        Python with hpcfl installed (default: python3 on PATH, e.g. an activated venv)
#   HPCFL_DATA_DIR      MNIST, staged once on a login node: `python -m hpcfl fetch-data`
#   HPCFL_RUNS          where the per-job result folders go (default: $SLURM_SUBMIT_DIR/runs)
#   HPCFL_RUN_DIR       this job's folder (default: $HPCFL_RUNS/<job id>); an earlier job's
#                       folder resumes that run from its checkpoints
#   HPCFL_ARGS          extra hpcfl options, appended, so they win over the script's own; split
#                       with shell quoting rules (Python's shlex), never evaluated: a path with
#                       spaces is HPCFL_ARGS="--data-dir '/my data'"
#   HPCFL_MAX_REQUEUES  how many times a preempted job requeues itself (default 5; an integer)
#   HPCFL_LAUNCHER      srun or mpirun (default: srun inside a SLURM job, else mpirun)
#   HPCFL_SRUN_MPI      srun's --mpi plugin (default pmi2: the mpich wheel speaks it, not pmix)
#   HPCFL_JOBS_DIR      the jobs/ folder holding this file (read by the scripts before they source
#                       it; default: found from the path of the submitted script)
#   HPCFL_SITE          a file sourced first: modules, the venv (default: jobs/site.sh)
#   HPCFL_NTASKS        ranks of a local dry run (`bash jobs/X.sbatch`, outside SLURM; default 2)

EXIT_PREEMPTED=75   # hpcfl's exit code after it checkpointed on SIGTERM/SIGUSR1 (EX_TEMPFAIL)

# The site's environment first (modules, the venv, HPCFL_* under --export=NONE): jobs/site.sh,
# or the file HPCFL_SITE names.
_site=${HPCFL_SITE:-$(dirname "${BASH_SOURCE[0]}")/site.sh}
if [[ -f $_site ]]; then
    # shellcheck source=/dev/null
    source "$_site" || { echo "jobs/lib.sh: $_site failed" >&2; exit 2; }
fi

log() { echo "[$(date +%T) job ${SLURM_JOB_ID:-local} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# integer VALUE NAME: VALUE must be a non-negative integer. Bash arithmetic evaluates what it is
# given ($(( a[$(cmd)] )) runs cmd), so nothing from the environment reaches it unchecked.
integer() {
    [[ $1 =~ ^[0-9]+$ ]] && return 0
    log "error: $2 must be a non-negative integer, got '$1'"
    exit 2
}

PYTHON=${HPCFL_PYTHON:-python3}
RUN_DIR=${HPCFL_RUN_DIR:-${HPCFL_RUNS:-${SLURM_SUBMIT_DIR:-$PWD}/runs}/${SLURM_JOB_ID:-local-$$}}
THREADS=${SLURM_CPUS_PER_TASK:-1}   # BLAS/Numba threads per rank
NTASKS=${SLURM_NTASKS:-${HPCFL_NTASKS:-2}}   # ranks per launch (outside SLURM: HPCFL_NTASKS, default 2)
integer "$THREADS" SLURM_CPUS_PER_TASK
integer "$NTASKS" SLURM_NTASKS
integer "${HPCFL_MAX_REQUEUES:-5}" HPCFL_MAX_REQUEUES
integer "${SLURM_RESTART_COUNT:-0}" SLURM_RESTART_COUNT

# HPCFL_ARGS as an array, split by shlex: quoting works, nothing is expanded or run.
EXTRA_ARGS=()
if [[ -n ${HPCFL_ARGS:-} ]]; then
    _words=$(mktemp)
    "$PYTHON" -c 'import os, shlex, sys
try:
    words = shlex.split(os.environ["HPCFL_ARGS"])
except ValueError as exc:
    sys.exit(f"HPCFL_ARGS: {exc}")
sys.stdout.write("".join(w + "\0" for w in words))' > "$_words" || { rm -f "$_words"; log "error: cannot split HPCFL_ARGS"; exit 2; }
    mapfile -d '' -t EXTRA_ARGS < "$_words"
    rm -f "$_words"
fi
mkdir -p "$RUN_DIR"

# hpcfl_run ARGS...: `python -m hpcfl ARGS` on NTASKS ranks; returns its exit code.
# The batch shell alone gets `--signal=B:USR1` (and SIGTERM from scancel); the trap forwards it
# to the launcher, which passes it to every rank: they checkpoint and exit 75. Bash runs a trap
# only between commands, hence the launch in the background and `wait`.
hpcfl_run() {
    # srun inside a SLURM job, mpirun outside one (`bash jobs/X.sbatch`: a local dry run)
    local launcher=${HPCFL_LAUNCHER:-$([[ -n ${SLURM_JOB_ID:-} ]] && command -v srun >/dev/null && echo srun || echo mpirun)}
    local cmd pid rc sig
    if [[ $launcher == srun ]]; then
        # --kill-on-bad-exit: otherwise a rank that dies leaves the others blocked in a
        # collective until the time limit (MPI_Abort and mpirun need no such flag)
        cmd=(srun -n "$NTASKS" --mpi="${HPCFL_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1)
    else
        cmd=(mpirun -n "$NTASKS")
    fi
    log "${cmd[*]} $PYTHON -m hpcfl $*"
    "${cmd[@]}" "$PYTHON" -m hpcfl "$@" &
    pid=$!
    for sig in USR1 TERM; do
        trap "STOP_SIGNAL=$sig; log 'got SIG$sig: forwarding SIGUSR1 to the ranks'; kill -USR1 $pid 2>/dev/null" $sig
    done
    while :; do
        rc=0
        wait "$pid" || rc=$?
        # above 128 with the launcher still running: wait was cut short to run the trap
        (( rc > 128 )) && kill -0 "$pid" 2>/dev/null && continue
        break
    done
    trap - USR1 TERM
    return "$rc"
}

# hpcfl_finish RC: requeue on a preemption exit (the next run resumes from the checkpoint,
# since the scripts always pass --resume), else end the job with RC. Not after a SIGTERM to the
# batch shell: that is scancel or the hard time limit, and a job being cancelled stays cancelled
# (a scheduler that preempts with PreemptMode=REQUEUE requeues the job itself).
hpcfl_finish() {
    local rc=$1 max=${HPCFL_MAX_REQUEUES:-5} restarts=${SLURM_RESTART_COUNT:-0}
    if (( rc == EXIT_PREEMPTED )); then
        if [[ ${STOP_SIGNAL:-} == TERM ]]; then
            log "stopped by SIGTERM (cancelled or out of time): not requeueing; to resume, resubmit with HPCFL_RUN_DIR=$RUN_DIR"
        elif [[ -n ${SLURM_JOB_ID:-} ]] && (( restarts < max )); then
            log "preempted: checkpoint saved; requeueing (restart $((restarts + 1)) of at most $max)"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            log "scontrol requeue failed; to resume, resubmit with HPCFL_RUN_DIR=$RUN_DIR"
        else
            log "preempted after $restarts restarts (HPCFL_MAX_REQUEUES=$max): not requeueing; to resume, resubmit with HPCFL_RUN_DIR=$RUN_DIR"
        fi
    fi
    log "done: exit $rc; results in $RUN_DIR"
    exit "$rc"
}
