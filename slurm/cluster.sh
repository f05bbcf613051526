#!/usr/bin/env bash
# A private one-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) living in one
# directory, for tests and demos on a single machine. Must run as root.
#
#   slurm/cluster.sh install        install the Debian packages (idempotent)
#   slurm/cluster.sh up DIR         start a cluster whose state, logs and sockets all live in DIR;
#                                   prints `export SLURM_CONF=DIR/etc/slurm.conf`
#   slurm/cluster.sh down DIR       stop every daemon started by `up DIR` (safe to repeat)
#   slurm/cluster.sh status DIR     exit 0 when the controller answers
#
# Why it looks like this (facts seen on Debian 12's Slurm 22.05):
# - every daemon runs in the foreground under `setsid`, so it survives the calling shell and
#   `down` finds it by its pid file;
# - munge runs with its own key and socket; the Slurm daemons and clients reach it through
#   `AuthInfo=socket=...`, and `AccountingStoragePass` must name the same socket or slurmctld
#   and sacctmgr fall back to the default socket and fail;
# - accounting (slurmdbd + MariaDB) is required: submitit polls `sacct`, and without it a
#   cancelled job makes `.result()` wait forever;
# - no cgroups here: proctrack/linuxproc, task/none.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
CLUSTER_NAME=effad

die() { echo "cluster.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (the daemons run as root in a private directory)"; }

install_packages() {
    need_root
    local missing=()
    for exe in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd; do
        command -v "$exe" >/dev/null 2>&1 || missing+=("$exe")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "cluster.sh: installing ${PACKAGES[*]} (missing: ${missing[*]})" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME CMD... : run CMD detached in its own session, logging to DIR/log/NAME.out
start() {
    local name=$1; shift
    setsid "$@" >"$DIR/log/$name.out" 2>&1 < /dev/null &
    echo $! > "$DIR/run/$name.pid"
}

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "cluster.sh: timed out waiting for $what; logs in $DIR/log:" >&2
            tail -n 20 "$DIR"/log/*.out >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

up() {
    need_root
    install_packages
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    if [ -f "$DIR/etc/slurm.conf" ] && SLURM_CONF="$DIR/etc/slurm.conf" scontrol ping >/dev/null 2>&1; then
        echo "export SLURM_CONF=$DIR/etc/slurm.conf"
        return 0
    fi
    mkdir -p "$DIR"/{etc,run,log,munge,mysql,state,spool}
    # A cluster that fails half-way must not leave daemons behind.
    trap 'down' ERR
    # munge clients need to traverse to the socket; the key itself stays 0400.
    chmod 711 "$DIR/munge"

    local node host_cpus mem_mb db_port dbd_port ctld_port slurmd_port
    node=$(hostname -s)
    host_cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    db_port=$(free_port); dbd_port=$(free_port); ctld_port=$(free_port); slurmd_port=$(free_port)
    local sock="$DIR/munge/munge.sock"

    # munge: private key and socket
    [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" --force
    chmod 400 "$DIR/munge/munge.key"
    start munged munged --foreground --force --socket="$sock" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.daemon.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for 20 munge munge -n -S "$sock"

    # MariaDB for accounting, on loopback TCP only
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
        mariadb-install-db --user=root --datadir="$DIR/mysql/data" --auth-root-authentication-method=normal \
            --skip-test-db >"$DIR/log/mariadb-install.out" 2>&1 || { cat "$DIR/log/mariadb-install.out" >&2; die "mariadb-install-db failed"; }
    fi
    start mariadbd mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
        --socket="$DIR/mysql/mysql.sock" --pid-file="$DIR/run/mariadbd.daemon.pid" \
        --bind-address=127.0.0.1 --port="$db_port" --log-error="$DIR/log/mariadbd.log" \
        --innodb-buffer-pool-size=64M
    wait_for 60 mariadb mariadb-admin --no-defaults --socket="$DIR/mysql/mysql.sock" -uroot ping

    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$DIR/run/slurmdbd.daemon.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"

    cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$sock
JobCompType=jobcomp/none
JobRequeue=1
# The controller keeps ended jobs for an hour: accounting can lag behind it (a job cancelled while
# it waited on a dependency was once missing from sacct after 5 min in CI), and some tests run longer.
MinJobAge=3600
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
NodeName=$node NodeAddr=127.0.0.1 CPUs=$host_cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$DIR/etc/slurm.conf"

    # slurmdbd has no -f: it reads slurmdbd.conf beside $SLURM_CONF.
    start slurmdbd slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null 2>&1 || true

    start slurmctld slurmctld -D -f "$SLURM_CONF"
    wait_for 60 slurmctld scontrol ping
    start slurmd slurmd -D -f "$SLURM_CONF" -N "$node"
    wait_for 60 "node $node to be idle" bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"

    trap - ERR
    echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
    [ -d "$DIR/run" ] || return 0
    # Cancel this cluster's jobs through Slurm first: their slurmstepd processes run in sessions
    # of their own and would outlive the daemons.
    if [ -f "$DIR/etc/slurm.conf" ] && SLURM_CONF="$DIR/etc/slurm.conf" scontrol ping >/dev/null 2>&1; then
        SLURM_CONF="$DIR/etc/slurm.conf" scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 20); do
            [ -z "$(SLURM_CONF="$DIR/etc/slurm.conf" squeue -h 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    # Clients first, storage last, so nothing is left waiting on a dead peer.
    local name pid
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        [ -f "$DIR/run/$name.pid" ] || continue
        pid=$(cat "$DIR/run/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/run/$name.pid"
    done
}

status() {
    [ -f "$DIR/etc/slurm.conf" ] || die "no cluster in $DIR"
    SLURM_CONF="$DIR/etc/slurm.conf" scontrol ping
}

cmd=${1:-}
case "$cmd" in
    install) install_packages ;;
    up|down|status)
        [ $# -eq 2 ] || die "usage: $0 $cmd DIR"
        DIR=$2
        "$cmd" ;;
    *) die "usage: $0 install | up DIR | down DIR | status DIR" ;;
esac
