#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by scripts/slurm/start.sh, its slurmdbd and
# MariaDB too (idempotent).
set -euo pipefail

stop() {  # stop NAME PIDFILE
    local name=$1 pf=$2 pid
    [[ -f $pf ]] || return 0
    pid=$(cat "$pf")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        echo "slurm/stop.sh: stopped $name ($pid)"
    fi
    rm -f "$pf"
}
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop slurmdbd /run/slurmdbd.pid
stop mariadbd /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid
