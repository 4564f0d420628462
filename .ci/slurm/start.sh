#!/usr/bin/env bash
# Start a one-node SLURM cluster on 127.0.0.1 with two fake GPUs, for CI.
#
#   .ci/slurm/start.sh     # installs Debian's SLURM + munge if missing, starts the
#                          # daemons, waits until the node is idle
#   .ci/slurm/stop.sh      # stops them again
#
# Debian 12 ships SLURM 22.05. There is no systemd, so munged, slurmctld and
# slurmd are started by hand; their pid files, logs and spool live under
# $CXRFLOW_SLURM_DIR (default /tmp/cxrflow-slurm). Running this twice leaves one
# cluster. If the node does not come up, the daemons' log tails are printed,
# everything is stopped again and the script exits non-zero.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${CXRFLOW_SLURM_DIR:-/tmp/cxrflow-slurm}
partition=${CXRFLOW_SLURM_PARTITION:-ci}
# Declared node size, not the runner's (see slurm.conf.in).
cpus=${CXRFLOW_SLURM_CPUS:-16}
mem_mb=${CXRFLOW_SLURM_MEM_MB:-131072}
wait_s=${CXRFLOW_SLURM_WAIT_S:-60}
# The job step that the Snakemake plugin starts drops SLURM_CONF, so the inner
# srun only finds the configuration at the compiled-in default location.
etc=/etc/slurm
host=$(hostname -s)
mungekey=/etc/munge/munge.key

if [[ $(id -u) -ne 0 ]]; then
    keep=$(compgen -e | grep '^CXRFLOW_SLURM_' | paste -sd, - || true)
    exec sudo ${keep:+--preserve-env="$keep"} bash "$0" "$@"
fi

log() { echo "[slurm-ci] $*" >&2; }

pid_alive() {  # pid_alive PIDFILE NAME: the pid file names a live process called NAME
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

pid_dead() {  # pid_dead PIDFILE NAME: the pid file exists but its process is gone
    [[ -s $1 ]] && ! pid_alive "$1" "$2"
}

node_state() {
    sinfo --noheader --nodes="$host" --format=%T 2>/dev/null | head -n 1
}

show_logs() {
    local f
    for f in "$state"/log/slurmctld.log "$state"/log/slurmd.log /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 40 "$f" >&2
    done
    sinfo --long --Node >&2 2>&1 || true
}

fail() {
    log "ERROR: $*"
    show_logs
    "$here/stop.sh" || true
    exit 1
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]}"
    # Keep the packages' init scripts from starting the distro services: this
    # script starts its own daemons with its own configuration.
    local policy=/usr/sbin/policy-rc.d ours_policy=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        ours_policy=$policy
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
        [[ -n $ours_policy ]] && rm -f "$ours_policy"
        log "ERROR: apt-get install ${missing[*]} failed"
        exit 1
    }
    [[ -n $ours_policy ]] && rm -f "$ours_policy"
    return 0
}

render() {  # render TEMPLATE: print it with the placeholders filled in
    sed -e "s|@STATE@|$state|g" -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" \
        -e "s|@MEM_MB@|$mem_mb|g" -e "s|@PARTITION@|$partition|g" "$1"
}

write_config() {
    mkdir -p "$state"/{etc,log,run,fakegpu,spool/slurmctld,spool/slurmd} "$etc"
    ln -sfn /dev/null "$state/fakegpu/nvidia0"
    ln -sfn /dev/null "$state/fakegpu/nvidia1"
    render "$here/slurm.conf.in" >"$state/etc/slurm.conf"
    render "$here/gres.conf.in" >"$state/etc/gres.conf"
    install -m 0755 "$here/epilog.sh" "$state/etc/epilog.sh"
    # Each start begins with empty job records, as slurmctld -c begins with no jobs.
    : >"$state/log/jobcomp.txt"
    : >"$state/log/gpus.txt"
    local name target
    for name in slurm.conf gres.conf; do
        target=$etc/$name
        # Never overwrite a configuration that this script did not write.
        if [[ -e $target ]] && ! grep -q "written by .ci/slurm/start.sh" "$target"; then
            fail "$target exists and was not written by this script; move it away first"
        fi
        rm -f "$target"
        ln -sfn "$state/etc/$name" "$target"
    done
}

start_munge() {
    if pid_alive /run/munge/munged.pid munged; then
        log "munged already running"
        return
    fi
    if [[ ! -s $mungekey ]]; then
        mkdir -p "$(dirname "$mungekey")"
        dd if=/dev/urandom of="$mungekey" bs=1024 count=1 status=none
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown "$user:" "$mungekey" /run/munge /var/log/munge /var/lib/munge
    # munged refuses a key that others can read and a socket folder that
    # clients cannot enter.
    chmod 0400 "$mungekey"
    chmod 0755 /run/munge
    chmod 0700 /var/log/munge /var/lib/munge
    if [[ $user == root ]]; then
        munged --force
    else
        runuser -u munge -- munged
    fi
    touch "$state/run/munged.ours"
    munge -n | unmunge >/dev/null || fail "munge does not work"
}

cluster_up() {
    pid_alive "$state/run/slurmctld.pid" slurmctld &&
        pid_alive "$state/run/slurmd.pid" slurmd &&
        [[ $(node_state) =~ ^(idle|mixed|allocated)$ ]]
}

config_unchanged() {
    cmp -s <(render "$here/slurm.conf.in") "$state/etc/slurm.conf" &&
        cmp -s <(render "$here/gres.conf.in") "$state/etc/gres.conf" &&
        cmp -s "$here/epilog.sh" "$state/etc/epilog.sh"
}

install_packages
if cluster_up && config_unchanged; then
    log "cluster already up: node $host is $(node_state)"
    exit 0
fi
# A half-started or outdated cluster is stopped first, so a rerun starts clean.
"$here/stop.sh"
write_config
start_munge
log "starting slurmctld and slurmd (node $host, partition $partition)"
# -c: start without jobs from an earlier run.
slurmctld -c || fail "slurmctld did not start"
slurmd || fail "slurmd did not start"

deadline=$((SECONDS + wait_s))
# The daemons write their pid files a moment after they fork into the background.
until cluster_up && [[ $(node_state) == idle ]]; do
    pid_dead "$state/run/slurmctld.pid" slurmctld && fail "slurmctld exited"
    pid_dead "$state/run/slurmd.pid" slurmd && fail "slurmd exited"
    ((SECONDS < deadline)) || fail "node $host not idle after ${wait_s}s (state: $(node_state))"
    sleep 1
done
log "cluster up after ${SECONDS}s"
sinfo --Node --long
