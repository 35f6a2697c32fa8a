#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine (dev and CI): bash scripts/slurm/start.sh
#
# Idempotent: installs slurm-wlm + munge (and slurmdbd + mariadb-server) with apt when missing,
# writes /etc/slurm for this host (fake GPUs: gres gpu:4 backed by /dev/cruijff-fakegpu0..3),
# starts munged, MariaDB, slurmdbd, slurmctld and slurmd as daemons, and waits until the node is
# usable. When everything is already up with the same config, it only verifies. Needs root.
# Logs: /var/log/slurm/ (mariadb.log too), /var/log/munge/.
# Job accounting: jobacct_gather/linux samples every task each second, so `sacct` has each job
# step's MaxRSS and TotalCPU, and OverMemoryKill ends a step whose memory passes its --mem (no
# cgroups needed); slurmdbd keeps the records in a MariaDB that listens on no port (socket only).
# The job completion log (jobcomp/filetxt, `sacct -c`) is kept as well.
# Env: CRUIJFF_SLURM_WAIT (seconds to wait for the node, default 60);
#      CRUIJFF_SLURM_ACCOUNTING=0: no slurmdbd/MariaDB (sacct then fails; `sacct -c` still works).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"

t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
die() { echo "slurm/start.sh: error: $*" >&2; exit 1; }
log_tail() {
    local f
    for f in /var/log/munge/munged.log /var/log/slurm/mariadb.log /var/log/slurm/slurmdbd.log \
            /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; do
        [[ -f $f ]] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    return 0
}

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts slurmctld/slurmd)"
accounting=${CRUIJFF_SLURM_ACCOUNTING:-1}
[[ $accounting == [01] ]] || die "CRUIJFF_SLURM_ACCOUNTING must be 0 or 1, not '$accounting'"

# ---------------------------------------------------------------- install
install_s="0.0"
packages=()
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
    packages+=(slurm-wlm munge)
fi
if (( accounting )) && { ! command -v slurmdbd >/dev/null || [[ ! -x /usr/sbin/mariadbd ]]; }; then
    packages+=(slurmdbd mariadb-server)
fi
if (( ${#packages[@]} )); then
    ti=$(date +%s.%N)
    apt_install "${packages[@]}"
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

if (( accounting )); then
    accounting_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$node
AccountingStorageTRES=gres/gpu"
else
    accounting_lines="AccountingStorageType=accounting_storage/none"
fi
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
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
$accounting_lines
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

# ---------------------------------------------------------------- accounting: MariaDB, slurmdbd
# Before slurmctld, which sends its records to slurmdbd from the start. A 32 MB buffer pool is
# plenty for a test cluster (slurmdbd logs that it recommends more).
db_socket=/run/mysqld/mysqld.sock
db_cnf=/etc/slurm/cruijff-mariadb.cnf
sql() { mariadb --no-defaults --socket="$db_socket" -u root -N -B -e "$1"; }
if (( accounting )); then
    new_db_cnf=$(cat <<CONF
# Written by cruijff scripts/slurm/start.sh: slurmdbd's database, reached by its socket only.
[mysqld]
user=mysql
datadir=/var/lib/mysql
socket=$db_socket
pid-file=/run/mysqld/mysqld.pid
log-error=/var/log/slurm/mariadb.log
skip-networking
innodb_buffer_pool_size=32M
innodb_lock_wait_timeout=900
CONF
)
    db_changed=0
    if [[ ! -f $db_cnf ]] || [[ "$(cat "$db_cnf")" != "$new_db_cnf" ]]; then
        printf '%s\n' "$new_db_cnf" > "$db_cnf"; db_changed=1
    fi
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    install -d -o mysql -g mysql -m 0750 /var/lib/mysql
    db_log=/var/log/slurm/mariadb.log  # mariadbd writes it as mysql
    [[ -f $db_log ]] || install -o mysql -g mysql -m 0640 /dev/null "$db_log"
    if running /run/mysqld/mysqld.pid mariadbd && (( db_changed )); then
        pid=$(cat /run/mysqld/mysqld.pid); kill "$pid"
        for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    if ! running /run/mysqld/mysqld.pid mariadbd; then
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            mariadb-install-db --defaults-file="$db_cnf" --user=mysql --datadir=/var/lib/mysql \
                --skip-test-db --auth-root-authentication-method=socket >/dev/null \
                || { log_tail; die "mariadb-install-db failed"; }
        fi
        setsid /usr/sbin/mariadbd --defaults-file="$db_cnf" </dev/null >/dev/null 2>&1 &
        started+=(mariadbd)
    fi
    for _ in $(seq 300); do sql "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
    sql "SELECT 1" >/dev/null || { log_tail; die "MariaDB does not answer on $db_socket"; }

    # slurmdbd's own database user; its password lives only in slurmdbd.conf (mode 0600).
    dbd_conf=/etc/slurm/slurmdbd.conf
    pass=$(sed -n 's/^StoragePass=//p' "$dbd_conf" 2>/dev/null || true)
    [[ $pass =~ ^[A-Za-z0-9]{16,}$ ]] || pass=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
    sql "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
         ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
        || { log_tail; die "could not create slurmdbd's database user"; }
    new_dbd=$(cat <<CONF
# Written by cruijff scripts/slurm/start.sh for host $node (holds a password: mode 0600).
AuthType=auth/munge
DbdHost=$node
SlurmUser=root
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
CONF
)
    dbd_changed=0
    if [[ ! -f $dbd_conf ]] || [[ "$(cat "$dbd_conf")" != "$new_dbd" ]]; then
        (umask 077; printf '%s\n' "$new_dbd" > "$dbd_conf"); dbd_changed=1
    fi
    chown root:root "$dbd_conf"; chmod 0600 "$dbd_conf"
    if running /run/slurmdbd.pid slurmdbd && (( dbd_changed )); then
        pid=$(cat /run/slurmdbd.pid); kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    if ! running /run/slurmdbd.pid slurmdbd; then
        /usr/sbin/slurmdbd || { log_tail; die "slurmdbd did not start"; }
        started+=(slurmdbd)
        dbd_changed=1
    fi
    if (( dbd_changed )); then
        # Ready once it answers (its first start creates the tables); then the cluster is known.
        clusters=""
        for _ in $(seq 300); do
            clusters=$(sacctmgr -n -P list cluster format=cluster 2>/dev/null) && break
            sleep 0.1
        done
        sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1 \
            || { log_tail; die "slurmdbd does not answer (sacctmgr list cluster)"; }
        if ! grep -qx cruijff <<<"$clusters"; then
            sacctmgr -i add cluster cruijff >/dev/null || { log_tail; die "sacctmgr add cluster failed"; }
        fi
    fi
fi

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
(( accounting )) && version+=", accounting slurmdbd" || version+=", no accounting storage"
if (( ${#started[@]} == 0 && ! changed )); then
    echo "slurm: already up ($version, node $node $state, ${cpus} CPUs, ${real_mb} MB, gpu:$ngpu; verified in $(elapsed "$t0") s)"
else
    echo "slurm: up ($version, node $node $state, ${cpus} CPUs, ${real_mb} MB, gpu:$ngpu; install ${install_s} s, start $(elapsed "$ts") s; started: ${started[*]:-none}$( (( changed )) && echo ", config written"))"
fi
