#!/usr/bin/env bash
# Stop the local PostgreSQL that scripts/postgres/start.sh started: bash scripts/postgres/stop.sh
# Keeps its data (the cluster <newest version>/main); start.sh brings it back. Needs root.
set -euo pipefail
CLUSTER=main
ver=$({ ls /usr/lib/postgresql 2>/dev/null || true; } | sort -V | tail -n1)
if [[ -z $ver ]] || ! command -v pg_ctlcluster >/dev/null \
    || [[ -z $(pg_lsclusters -h "$ver" "$CLUSTER" 2>/dev/null) ]]; then
    echo "postgres: not installed (no cluster $CLUSTER)"; exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "postgres/stop.sh: error: must run as root" >&2; exit 1; }
if [[ $(pg_lsclusters -h "$ver" "$CLUSTER" | awk '{ print $4 }') == online* ]]; then
    pg_ctlcluster "$ver" "$CLUSTER" stop -m fast
    echo "postgres: stopped (cluster $ver/$CLUSTER)"
else
    echo "postgres: not running (cluster $ver/$CLUSTER)"
fi
