#!/usr/bin/env bash
# Stop the CI SLURM cluster that .ci/slurm/start.sh started.
#
# Jobs still queued or running are cancelled first, then slurmd, slurmctld and
# (if start.sh started it) munged are stopped by the pids in their pid files.
# The links /etc/slurm/{slurm,gres}.conf go; logs and job records stay in
# $CXRFLOW_SLURM_DIR for the CI log.
# Exits 0 when nothing is running; exits 1 if a daemon survives SIGKILL.
set -euo pipefail

state=${CXRFLOW_SLURM_DIR:-/tmp/cxrflow-slurm}

if [[ $(id -u) -ne 0 ]]; then
    exec sudo --preserve-env=CXRFLOW_SLURM_DIR bash "$0" "$@"
fi

log() { echo "[slurm-ci] $*" >&2; }

live_pid() {  # live_pid PIDFILE NAME: print the pid if it is a live process called NAME
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

stop_daemon() {  # stop_daemon PIDFILE NAME
    local pid i
    if ! pid=$(live_pid "$1" "$2"); then
        rm -f "$1"
        return 0
    fi
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        log "$2 ignored SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    if [[ -d /proc/$pid ]]; then
        log "ERROR: $2 (pid $pid) is still running"
        return 1
    fi
    rm -f "$1"
}

if live_pid "$state/run/slurmctld.pid" slurmctld >/dev/null &&
    [[ -n $(squeue --noheader --states=PENDING,RUNNING,CONFIGURING,COMPLETING 2>/dev/null) ]]; then
    log "cancelling jobs that are still queued or running"
    squeue --noheader --format=%i | xargs -r scancel --full || true
    for ((i = 0; i < 30; i++)); do
        [[ -z $(squeue --noheader --states=PENDING,RUNNING,CONFIGURING,COMPLETING 2>/dev/null) ]] && break
        sleep 1
    done
fi

status=0
stop_daemon "$state/run/slurmd.pid" slurmd || status=1
stop_daemon "$state/run/slurmctld.pid" slurmctld || status=1
# A munged that was running before start.sh (a real host's) is left alone.
if [[ -e $state/run/munged.ours ]]; then
    stop_daemon /run/munge/munged.pid munged || status=1
    [[ $status -ne 0 ]] || rm -f "$state/run/munged.ours"
fi
# With a slurm.conf but no controller, every SLURM command, and so every start
# of Snakemake (its SLURM plugin asks scontrol), waits ~9 s for a timeout.
for name in slurm.conf gres.conf; do
    if [[ -L /etc/slurm/$name && $(readlink "/etc/slurm/$name") == "$state/etc/$name" ]]; then
        rm -f "/etc/slurm/$name"
    fi
done
exit "$status"
