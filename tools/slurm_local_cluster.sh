#!/usr/bin/env bash
# A real Slurm (munged + slurmctld + one slurmd per node) on loopback, for tests and for trying the
# job scripts on a laptop. No systemd needed: daemons are started by hand and stopped by PID.
#
#   tools/slurm_local_cluster.sh install          # apt-get install slurmctld slurmd slurm-client munge (no-op when present)
#   tools/slurm_local_cluster.sh up               # (re)start a clean 1-node cluster; prints `export SLURM_CONF=...`
#   tools/slurm_local_cluster.sh up --nodes 2     # nodes n1..nN, one slurmd each, NodeAddr 127.0.0.1..127.0.0.N
#   tools/slurm_local_cluster.sh status           # sinfo + squeue
#   tools/slurm_local_cluster.sh down             # cancel jobs, stop the daemons
#
# With --nodes N > 1 the node names do not resolve and each node has its own loopback address
# (127.0.0.i; Linux routes all of 127/8 to lo), so anything that binds or connects by node name
# instead of Slurm's NodeAddr fails here as it would on a real cluster.
#
# Environment:
#   SLURM_LOCAL_DIR      state/spool/logs/config live here (default /tmp/erpo-slurm); wiped by `up`
#   ERPO_SLURM_CPUS      CPUs each node advertises (default: nproc; more is allowed via config_overrides)
#   ERPO_SLURM_CTLD_PORT slurmctld port (default 6817); the slurmds use the next N ports, so two
#                        clusters side by side (own SLURM_LOCAL_DIR) need ctld ports more than N apart
#   ERPO_SLURM_UP_TIMEOUT seconds to wait for the nodes to become idle (default 60)
#   ERPO_SLURM_FIRST_JOB_ID first job id (default 1 + (ctld port % 100) * 101): the launcher derives
#                        its ports from the job id, and every fresh cluster would otherwise start at
#                        job 1, so two clusters side by side would hand out the same ports
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/erpo-slurm}"
CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
CTLD_PORT="${ERPO_SLURM_CTLD_PORT:-6817}"
FIRST_JOB_ID="${ERPO_SLURM_FIRST_JOB_ID:-$((1 + (CTLD_PORT % 100) * 101))}"
UP_TIMEOUT="${ERPO_SLURM_UP_TIMEOUT:-60}"

log() { printf '[slurm-local %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf '[slurm-local] ERROR: %s\n' "$*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (munged runs as the munge user, slurmd as root)"
}

cmd_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        log "slurm and munge already installed: $(slurmctld -V)"
        return 0
    fi
    need_root install
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
    log "installed $(slurmctld -V)"
}

# pid_alive FILE -> true when FILE names a running process
pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_daemons NAME=PIDFILE...: SIGTERM all at once (each takes ~2 s to exit), SIGKILL after 5 s.
stop_daemons() {
    local item name file pid i
    declare -A pids=()
    for item in "$@"; do
        name=${item%%=*} file=${item#*=}
        if pid_alive "$file"; then
            pids[$name]=$(cat "$file")
            kill -TERM "${pids[$name]}" 2>/dev/null || true
        fi
        rm -f "$file"
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            log "killed $name (pid $pid) after 5 s"
        else
            log "stopped $name (pid $pid)"
        fi
    done
}

cmd_down() {
    if [[ -f "$CONF" ]] && pid_alive "$DIR/slurmctld.pid"; then
        # Cancel jobs first so their slurmstepd processes exit with the job instead of outliving slurmd.
        local jobs
        jobs=$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null || true)
        if [[ -n "$jobs" ]]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 50); do
                [[ -z "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 0.2
            done
        fi
    fi
    local f daemons=()
    for f in "$DIR"/slurmd*.pid; do
        [[ -e "$f" ]] && daemons+=("$(basename "$f" .pid)=$f")
    done
    stop_daemons "${daemons[@]}" "slurmctld=$DIR/slurmctld.pid" "munged=$MUNGE_DIR/munged.pid"
}

# node_names N -> "localhost" for one node (the historical layout), else "n1 n2 ... nN"
node_names() {
    if (($1 == 1)); then echo localhost; else seq -f 'n%g' 1 "$1" | xargs; fi
}

write_conf() {
    local cpus=$1 mem_mb=$2 nodes=$3
    cat >"$CONF" <<EOF
# Written by tools/slurm_local_cluster.sh: $nodes node(s) on loopback, no accounting, no cgroups.
ClusterName=erpo-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Without this an oversize request pends forever instead of being rejected at submit time.
EnforcePartLimits=ALL
# Lets the node advertise more CPUs than it has (ERPO_SLURM_CPUS).
SlurmdParameters=config_overrides
MailProg=/bin/true
FirstJobId=$FIRST_JOB_ID
ReturnToService=2
# Short kill grace so a cancelled or failed job is torn down quickly; finished jobs stay visible to
# scontrol show job for MinJobAge seconds.
KillWait=5
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
EOF
    local names i=0 name
    names=$(node_names "$nodes")
    if ((nodes == 1)); then
        echo "NodeName=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >>"$CONF"
    else
        # Each slurmd has its own port and loopback address; the names resolve nowhere.
        for name in $names; do
            i=$((i + 1))
            echo "NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.$i Port=$((CTLD_PORT + i)) CPUs=$cpus" \
                "RealMemory=$mem_mb State=UNKNOWN" >>"$CONF"
        done
    fi
    echo "PartitionName=debug Nodes=${names// /,} Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

start_munge() {
    mkdir -p "$MUNGE_DIR"
    head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key"
    chown -R munge:munge "$MUNGE_DIR"
    chmod 711 "$MUNGE_DIR"
    chmod 400 "$MUNGE_DIR/munge.key"
    runuser -u munge -- munged \
        --socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || { cat "$MUNGE_DIR/munged.log" >&2 2>/dev/null; die "munged failed to start"; }
}

show_logs() {
    local f
    for f in "$MUNGE_DIR/munged.log" "$DIR/log/slurmctld.log" "$DIR"/log/slurmd*.log; do
        [[ -f "$f" ]] || continue
        echo "----- tail $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

cmd_up() {
    local nodes=1
    while (($#)); do
        case "$1" in
            --nodes) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ && "$2" -le 200 ]] \
                         || die "--nodes needs a number of nodes (1-200), got '${2:-}'"
                     nodes=$2; shift 2 ;;
            --nodes=*) set -- --nodes "${1#--nodes=}" "${@:2}" ;;
            *) die "up: unknown argument '$1' (use --nodes N)" ;;
        esac
    done
    need_root up
    command -v slurmctld >/dev/null || die "slurmctld not installed; run: $0 install"
    cmd_down >/dev/null
    rm -rf "$DIR"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 755 "$DIR"
    local cpus mem_mb
    cpus="${ERPO_SLURM_CPUS:-$(nproc)}"
    mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))
    write_conf "$cpus" "$mem_mb" "$nodes"
    start_munge
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF" || { show_logs; die "slurmctld failed to start"; }
    local name names
    names=$(node_names "$nodes")
    for name in $names; do
        slurmd -f "$CONF" -N "$name" || { show_logs; die "slurmd for node $name failed to start"; }
    done
    local deadline=$((SECONDS + UP_TIMEOUT)) states=""
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
        [[ "$states" == "$nodes idle" ]] && break
        sleep 0.3
    done
    if [[ "$states" != "$nodes idle" ]]; then
        show_logs
        die "nodes not all idle after ${UP_TIMEOUT}s (states: '${states:-no answer}'); logs above, config $CONF"
    fi
    log "cluster up: $nodes node(s) ($names), $cpus CPUs each, state in $DIR"
    echo "To use it:  export SLURM_CONF=$CONF"
    echo "Stop it:    $0 down"
}

cmd_status() {
    [[ -f "$CONF" ]] || die "no cluster config at $CONF; run: $0 up"
    export SLURM_CONF="$CONF"
    sinfo -N -l
    squeue
}

case "${1:-}" in
    install) cmd_install ;;
    up) shift; cmd_up "$@" ;;
    down) need_root down; cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|up [--nodes N]|down|status   (state dir: \$SLURM_LOCAL_DIR, default /tmp/erpo-slurm)" >&2; exit 2 ;;
esac
