#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine (dev and CI): bash scripts/slurm/start.sh
#
# Idempotent: installs slurm-wlm + munge with apt when missing, writes /etc/slurm for this host
# (fake GPUs: gres gpu:4 backed by /dev/cruijff-fakegpu0..3), starts munged, slurmctld and slurmd
# as daemons, and waits until the node is usable. When everything is already up with the same
# config, it only verifies. Needs root. Logs: /var/log/slurm/, /var/log/munge/.
# Env: CRUIJFF_SLURM_WAIT (seconds to wait for the node, default 60).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"

t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
die() { echo "slurm/start.sh: error: $*" >&2; exit 1; }
log_tail() {
    local f
    for f in /var/log/munge/munged.log /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; do
        [[ -f $f ]] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    return 0
}

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts slurmctld/slurmd)"

# ---------------------------------------------------------------- install
install_s="0.0"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
    ti=$(date +%s.%N)
    apt_install slurm-wlm munge
    install_s=$(elapsed "$ti")
fi
ts=$(date +%s.%N)

# ---------------------------------------------------------------- config
node=$(hostname -s)
cpus=$(nproc --all)
mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
# A bit below the machine's memory, so slurmd never drains the node for "low RealMemory".
real_mb=$(( mem_mb - (mem_mb / 20 > 512 ? mem_mb / 20 : 512) ))
(( real_mb > 256 )) || real_mb=$(( mem_mb * 9 / 10 ))
def_mem=$(( real_mb / cpus < 1024 ? real_mb / cpus : 1024 ))
major_minor=$(stat -c '%t %T' /dev/null)   # hex major/minor of /dev/null (1 3)
ngpu=4

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
for i in $(seq 0 $((ngpu - 1))); do
    dev=/dev/cruijff-fakegpu$i
    if [[ ! -c $dev ]]; then
        rm -f "$dev"
        mknod -m 0666 "$dev" c $((16#${major_minor% *})) $((16#${major_minor#* }))
    fi
done

new_conf=$(cat <<CONF
# Written by cruijff scripts/slurm/start.sh for host $node: a single-node dev/CI cluster.
ClusterName=cruijff
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=10
InactiveLimit=0
MinJobAge=2
KillWait=2
OverTimeLimit=0
Waittime=0
GresTypes=gpu
NodeName=$node CPUs=$cpus RealMemory=$real_mb Gres=gpu:$ngpu State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
)
new_gres=$(for i in $(seq 0 $((ngpu - 1))); do echo "NodeName=$node Name=gpu File=/dev/cruijff-fakegpu$i"; done)
changed=0
if [[ ! -f /etc/slurm/slurm.conf ]] || [[ "$(cat /etc/slurm/slurm.conf)" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" > /etc/slurm/slurm.conf; changed=1
fi
if [[ ! -f /etc/slurm/gres.conf ]] || [[ "$(cat /etc/slurm/gres.conf)" != "$new_gres" ]]; then
    printf '%s\n' "$new_gres" > /etc/slurm/gres.conf; changed=1
fi
# cgroup.conf is not used (proctrack/linuxproc, task/none); keep none so nothing probes cgroups.

# ---------------------------------------------------------------- munge
running() {  # running PIDFILE NAME: the pid file names a live process called NAME
    local pid
    [[ -f $1 ]] && pid=$(cat "$1") && [[ -n $pid ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}
started=()
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge
install -d -o munge -g munge -m 0700 /var/log/munge
if ! running /run/munge/munged.pid munged; then
    runuser -u munge -- /usr/sbin/munged || { log_tail; die "munged did not start"; }
    started+=(munged)
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || { log_tail; die "munge does not work"; }

# ---------------------------------------------------------------- slurm daemons
if (( changed )); then
    # New config: restart whatever runs so that it is read (node and gres changes need it).
    for d in slurmd slurmctld; do
        pf=/run/$d.pid
        if running "$pf" "$d"; then
            pid=$(cat "$pf"); kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if ! running /run/slurmctld.pid slurmctld; then
    /usr/sbin/slurmctld || { log_tail; die "slurmctld did not start"; }
    started+=(slurmctld)
fi
if ! running /run/slurmd.pid slurmd; then
    /usr/sbin/slurmd || { log_tail; die "slurmd did not start"; }
    started+=(slurmd)
fi

# ---------------------------------------------------------------- wait for the node
wait_s=${CRUIJFF_SLURM_WAIT:-60}
deadline=$(( $(date +%s) + wait_s ))
state=""
resumed=0
while :; do
    state=$(sinfo -h -n "$node" -o '%T' 2>/dev/null | head -n1 || true)
    case $state in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*)
            # A node left down/drained by an earlier run (e.g. config changed): bring it back once.
            if (( ! resumed )); then
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    if (( $(date +%s) >= deadline )); then
        log_tail
        sinfo -N -l >&2 || true
        die "node $node is not up after ${wait_s}s (sinfo state: '${state:-none}')"
    fi
    sleep 0.2
done

version=$(sinfo --version | awk '{ print $2 }')
if (( ${#started[@]} == 0 && ! changed )); then
    echo "slurm: already up ($version, node $node $state, ${cpus} CPUs, ${real_mb} MB, gpu:$ngpu; verified in $(elapsed "$t0") s)"
else
    echo "slurm: up ($version, node $node $state, ${cpus} CPUs, ${real_mb} MB, gpu:$ngpu; install ${install_s} s, start $(elapsed "$ts") s; started: ${started[*]:-none}$( (( changed )) && echo ", config written"))"
fi
