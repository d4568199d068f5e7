#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing `quantbench sweep --slurm`.
#
#   scripts/slurm-localhost.sh install   # apt-get install slurmctld slurmd slurm-client munge (root)
#   scripts/slurm-localhost.sh start     # install if needed, configure, start munged + slurmctld + slurmd
#   scripts/slurm-localhost.sh env       # prints `export SLURM_CONF=...` for clients (sbatch, squeue)
#   scripts/slurm-localhost.sh status    # the daemons' pids and sinfo
#   scripts/slurm-localhost.sh stop      # stops the daemons started by `start` and deletes their state
#
# Everything `start` creates lives under $QB_SLURM_DIR (default
# /var/tmp/quantbench-slurm): slurm.conf, its own munge key and socket, state,
# spool, logs and pid files. Nothing under /etc is written and no system
# service is started, so a machine's own Slurm or munge setup is left alone;
# clients find this cluster through SLURM_CONF. Ports: $QB_SLURM_PORT
# (slurmctld, default 6817) and QB_SLURM_PORT+1 (slurmd).
#
# Needs root (the daemons run as root, which is fine for a throwaway test
# cluster and nothing else) and, for `install`, apt (Debian/Ubuntu packages).
set -euo pipefail

DIR="${QB_SLURM_DIR:-/var/tmp/quantbench-slurm}"
PORT="${QB_SLURM_PORT:-6817}"
CONF="$DIR/etc/slurm.conf"
NODE="$(hostname -s)"

die() { echo "slurm-localhost: $*" >&2; exit 1; }
log() { echo "slurm-localhost: $*" >&2; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (the test cluster's daemons run as root)"
}

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null
}

cmd_install() {
    need_root
    if installed; then
        log "slurmctld, slurmd, sbatch and munged are already installed"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install slurmctld, slurmd, slurm-client and munge with this system's package manager"
    # Keep the packages' maintainer scripts from starting system services:
    # `start` runs private daemons instead.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
    fi
    local rc=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge || rc=$?
    [ "$added_policy" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install failed (exit $rc)"
    installed || die "packages installed but slurmctld/slurmd/sbatch/munged are not on PATH"
    log "installed $(slurmctld -V)"
}

pid_of() { # prints the pid in pid file $1 when that process is alive
    local f="$1" pid
    [ -s "$f" ] || return 1
    pid="$(cat "$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

write_conf() {
    local cpus mem_mb
    cpus="$(nproc)"
    mem_mb="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    cat >"$CONF" <<EOF
# Written by quantbench scripts/slurm-localhost.sh: a one-node test cluster.
ClusterName=quantbench-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    # munged insists on private key/seed/log files and a socket directory
    # that everyone can traverse: $DIR/munge (0755) holds the socket,
    # $DIR/munge/private (0700) the rest.
    local m="$DIR/munge" p="$DIR/munge/private"
    if pid_of "$DIR/run/munged.pid" >/dev/null; then
        return
    fi
    mkdir -p "$p"
    if [ ! -s "$p/munge.key" ]; then
        dd if=/dev/urandom of="$p/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$m"
    chmod 755 "$m"
    chmod 700 "$p"
    chmod 400 "$p/munge.key"
    runuser -u munge -- /usr/sbin/munged \
        --socket="$m/munge.socket" \
        --key-file="$p/munge.key" \
        --pid-file="$m/munged.pid" \
        --log-file="$p/munged.log" \
        --seed-file="$p/munged.seed" ||
        die "munged failed to start (log: $p/munged.log)"
    for _ in $(seq 50); do
        [ -s "$m/munged.pid" ] && break
        sleep 0.1
    done
    cp "$m/munged.pid" "$DIR/run/munged.pid"
    munge -S "$m/munge.socket" -n </dev/null | unmunge -S "$m/munge.socket" >/dev/null ||
        die "munged does not answer on $m/munge.socket (log: $p/munged.log)"
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state="$(SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true)"
        case "$state" in
        idle | mixed | allocated) return 0 ;;
        down* | drain* | unknown*)
            SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            ;;
        esac
        sleep 0.5
    done
    die "node $NODE did not become idle (last state: '${state:-none}'); logs: $DIR/log/"
}

cmd_start() {
    need_root
    cmd_install
    mkdir -p "$DIR"/{etc,state,spool,log,run,munge}
    write_conf
    start_munge
    if ! pid_of "$DIR/run/slurmctld.pid" >/dev/null; then
        slurmctld -f "$CONF" -c || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
    fi
    for _ in $(seq 50); do
        SLURM_CONF="$CONF" scontrol ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    if ! pid_of "$DIR/run/slurmd.pid" >/dev/null; then
        slurmd -f "$CONF" || die "slurmd failed to start; see $DIR/log/slurmd.log"
    fi
    wait_idle
    log "cluster up: node $NODE, partition debug; clients need: export SLURM_CONF=$CONF"
    echo "export SLURM_CONF=$CONF"
}

stop_pidfile() { # stops the process in pid file $1, waiting up to 10 s
    local pid
    pid="$(pid_of "$1")" || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid did not stop on SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

cmd_stop() {
    [ -d "$DIR" ] || { log "nothing to stop ($DIR does not exist)"; return; }
    stop_pidfile "$DIR/run/slurmd.pid"
    stop_pidfile "$DIR/run/slurmctld.pid"
    stop_pidfile "$DIR/run/munged.pid"
    if [ "${1:-}" = "--keep" ]; then
        log "daemons stopped; state kept in $DIR"
    else
        rm -rf "$DIR"
        log "daemons stopped; $DIR removed (packages stay installed)"
    fi
}

cmd_status() {
    local name
    for name in munged slurmctld slurmd; do
        if pid="$(pid_of "$DIR/run/$name.pid")"; then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"
        fi
    done
    if [ -f "$CONF" ]; then
        SLURM_CONF="$CONF" sinfo 2>&1 || true
    fi
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) shift; cmd_stop "$@" ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
