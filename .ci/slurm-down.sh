#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by .ci/slurm-up.sh.
#   .ci/slurm-down.sh           stop slurmd + slurmctld (munged keeps running)
#   .ci/slurm-down.sh --all     also stop munged
#   .ci/slurm-down.sh --purge   stop everything and delete state, spool and logs
# Only processes named in the daemons' pid files are signalled.
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin
log() { printf '[slurm-down] %s\n' "$*" >&2; }

all=0; purge=0
for a in "$@"; do
    case "$a" in
        --all) all=1 ;;
        --purge) all=1; purge=1 ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) log "unknown argument: $a"; exit 2 ;;
    esac
done

alive() {  # running and not a zombie (PID 1 of a container may not reap daemons)
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null || true)
    [[ -n $st && $st != Z* ]]
}
stop_pidfile() {  # stop_pidfile <pidfile> <comm>
    local pf=$1 name=$2 pid
    [[ -s $pf ]] || return 0
    pid=$(cat "$pf" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null || true) == "$name" ]]; then
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 60); do alive "$pid" || break; sleep 0.25; done
        if alive "$pid"; then log "$name still alive; SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pf"
}

# Cancel remaining jobs so their processes go away with slurmd.
if command -v scancel >/dev/null 2>&1 && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    timeout 10 scancel --full --user=root 2>/dev/null || true
    timeout 10 scancel --full 2>/dev/null || true
    sleep 1
fi
stop_pidfile /run/slurmd.pid slurmd
stop_pidfile /run/slurmctld.pid slurmctld
if [[ $all == 1 ]]; then
    stop_pidfile /run/munge/munged.pid munged
fi
if [[ $purge == 1 ]]; then
    log "removing state, spool and logs"
    rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
fi
log "done"
exit 0
