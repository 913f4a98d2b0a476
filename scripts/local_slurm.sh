#!/bin/sh
# A single-node Slurm cluster on this machine, for the Slurm integration test and benchmark.
#
#   sudo scripts/local_slurm.sh start   # prints "export SLURM_CONF=..." for the client commands
#   sudo scripts/local_slurm.sh status
#   sudo scripts/local_slurm.sh stop    # cancels the jobs, stops everything 'start' started
#
# Everything lives in one folder, $LOCAL_SLURM_DIR (default /tmp/lesionlapse-slurm): a fresh
# munge key and munged socket, slurm.conf, spool and state directories, pid and log files.
# Nothing is written to /etc and the system munged (if any) is not used. Needs root and the
# Debian packages slurm-wlm and munge. Ports: $LOCAL_SLURM_PORT and $LOCAL_SLURM_PORT+1
# (default 16817, 16818). One node, "localhost", CPUs=2 (or $LOCAL_SLURM_CPUS), RealMemory from
# /proc/meminfo; one partition, "debug". Jobs run as root on this machine, so every path is
# "shared" by construction (a real cluster needs a shared filesystem: see docs/scaling.md).
# Jobs inherit the nice value of the sbatch call (PropagatePrioProcess=1), so that a benchmark
# run under "nice" competes with other work on the same terms whatever the backend.
set -eu

DIR=${LOCAL_SLURM_DIR:-/tmp/lesionlapse-slurm}
PORT=${LOCAL_SLURM_PORT:-16817}
CPUS=${LOCAL_SLURM_CPUS:-2}
CONF=$DIR/slurm.conf

die() { echo "local_slurm: $*" >&2; exit 1; }

kill_pidfile() {  # kill the process whose id is in $1 (if it is still running), wait for it
    [ -f "$1" ] || return 0
    pid=$(cat "$1" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd launches jobs as their owner)"
    for cmd in munged slurmctld slurmd sbatch; do
        command -v $cmd >/dev/null 2>&1 || die "$cmd not found: apt-get install slurm-wlm munge"
    done
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        die "already running in $DIR (run '$0 stop' first)"
    fi
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/munge"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    chmod 700 "$DIR/munge"

    # munge: a fresh key, our own socket
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 2>/dev/null
    chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || die "munged failed: see $DIR/munge/munged.log"

    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$CONF" <<EOF
ClusterName=lesionlapse
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DependencyParameters=kill_invalid_depend
ReturnToService=2
PropagatePrioProcess=1
MinJobAge=3600
KillWait=5
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$CONF"
    slurmctld -c -f "$CONF" || die "slurmctld failed: see $DIR/slurmctld.log"
    slurmd -f "$CONF" -N localhost || die "slurmd failed: see $DIR/slurmd.log"

    i=0
    until [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ]; do
        i=$((i + 1))
        if [ $i -gt 150 ]; then
            tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
            die "the node did not become idle within 30 s"
        fi
        sleep 0.2
    done
    echo "export SLURM_CONF=$CONF"
}

stop() {
    if [ -f "$CONF" ]; then
        export SLURM_CONF="$CONF"
        if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
            scancel --full --partition=debug 2>/dev/null || true
            i=0
            while [ -n "$(squeue -h -t running,completing 2>/dev/null)" ] && [ $i -lt 50 ]; do
                sleep 0.2; i=$((i + 1))
            done
        fi
    fi
    kill_pidfile "$DIR/slurmd.pid"
    kill_pidfile "$DIR/slurmctld.pid"
    kill_pidfile "$DIR/munge/munged.pid"
    echo "local_slurm: stopped ($DIR kept for its logs)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo && SLURM_CONF=$CONF squeue ;;
    *) echo "usage: $0 start|stop|status   (folder: \$LOCAL_SLURM_DIR, default $DIR)" >&2; exit 2 ;;
esac
