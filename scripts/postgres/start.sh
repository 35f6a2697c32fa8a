#!/usr/bin/env bash
# Start a local PostgreSQL for a Prefect server (dev and CI): bash scripts/postgres/start.sh
#
# Idempotent: installs Debian's `postgresql` with apt when missing, makes sure the cluster
# <newest version>/main exists, listens on 127.0.0.1 only (port 5432) and runs (pg_ctlcluster:
# no systemd needed), creates the role `prefect` (password `prefect`, may create databases) and
# the database `prefect` (UTF-8, owned by it) when missing, and waits until that role can log in.
# Prints one line on stdout, the database URL for Prefect:
#     postgresql+asyncpg://prefect:prefect@127.0.0.1:5432/prefect
# (use it as `cruijff server start --database-url URL`, or CRUIJFF_SERVER_DATABASE_URL=URL),
# and a line with timings on stderr. Needs root. Stop it with scripts/postgres/stop.sh.
# The password is a well-known dev/CI one: this server must never listen beyond 127.0.0.1.
# Env: CRUIJFF_POSTGRES_WAIT (seconds to wait for the server, default 60).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"

t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
die() { echo "postgres/start.sh: error: $*" >&2; exit 1; }

PORT=5432
HOST=127.0.0.1
ROLE=prefect
PASSWORD=prefect
DB=prefect
CLUSTER=main
export LANG=C.UTF-8 LC_ALL=C.UTF-8  # a cluster created here gets UTF-8, not SQL_ASCII

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts the cluster as postgres)"

newest_version() { { ls /usr/lib/postgresql 2>/dev/null || true; } | sort -V | tail -n1; }

# ---------------------------------------------------------------- install
install_s="0.0"
ver=$(newest_version)
if ! command -v pg_ctlcluster >/dev/null || [[ -z $ver || ! -x /usr/lib/postgresql/$ver/bin/postgres ]]; then
    ti=$(date +%s.%N)
    apt_install postgresql
    install_s=$(elapsed "$ti")
    ver=$(newest_version)
    [[ -n $ver ]] || die "apt installed postgresql, but /usr/lib/postgresql has no version"
fi
ts=$(date +%s.%N)
log=/var/log/postgresql/postgresql-$ver-$CLUSTER.log
log_tail() { [[ -f $log ]] && { echo "--- tail $log" >&2; tail -n 20 "$log" >&2; }; return 0; }

# ---------------------------------------------------------------- cluster and its settings
install -d -o postgres -g postgres -m 2775 /var/run/postgresql /var/log/postgresql
if [[ -z $(pg_lsclusters -h "$ver" "$CLUSTER" 2>/dev/null) ]]; then
    pg_createcluster --locale C.UTF-8 --port "$PORT" "$ver" "$CLUSTER" -- --auth-local=peer \
        --auth-host=scram-sha-256 >/dev/null || die "pg_createcluster $ver $CLUSTER failed"
fi
# Our settings in a drop-in (Debian's postgresql.conf includes conf.d/ last, so it wins).
changed=0
dropin=/etc/postgresql/$ver/$CLUSTER/conf.d/cruijff.conf
want=$(printf "# Written by cruijff scripts/postgres/start.sh\nlisten_addresses = '%s'\nport = %s" "$HOST" "$PORT")
if [[ ! -f $dropin || "$(cat "$dropin")" != "$want" ]]; then
    install -d -o postgres -g postgres "$(dirname "$dropin")"
    printf '%s\n' "$want" > "$dropin"; chown postgres:postgres "$dropin"; changed=1
fi

# ---------------------------------------------------------------- start
status=$(pg_lsclusters -h "$ver" "$CLUSTER" | awk '{ print $4 }')
started=""
if [[ $status == online* ]]; then
    if (( changed )); then
        pg_ctlcluster "$ver" "$CLUSTER" restart || { log_tail; die "restart failed"; }
        started="restarted (config changed)"
    fi
else
    pg_ctlcluster "$ver" "$CLUSTER" start || { log_tail; die "pg_ctlcluster $ver $CLUSTER start failed"; }
    started="started"
fi

wait_s=${CRUIJFF_POSTGRES_WAIT:-60}
deadline=$(( $(date +%s) + wait_s ))
until pg_isready -q -h "$HOST" -p "$PORT"; do
    if (( $(date +%s) >= deadline )); then
        log_tail; die "PostgreSQL does not accept connections on $HOST:$PORT after ${wait_s}s"
    fi
    sleep 0.1
done

# ---------------------------------------------------------------- role and database
su_psql() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"; }
if [[ -z $(su_psql -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'") ]]; then
    su_psql -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'"
else  # make sure an existing role can log in with the documented password
    su_psql -c "ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'"
fi
if [[ -z $(su_psql -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'") ]]; then
    su_psql -c "CREATE DATABASE $DB OWNER $ROLE ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0"
fi
PGPASSWORD=$PASSWORD psql -X -q -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DB" -tAc "SELECT 1" >/dev/null \
    || { log_tail; die "role $ROLE cannot log in to $DB on $HOST:$PORT with its password"; }

version=$(su_psql -tAc "SHOW server_version" | awk '{ print $1 }')
echo "postgres: ${started:-already up} (PostgreSQL $version, cluster $ver/$CLUSTER on $HOST:$PORT; install ${install_s} s, start $(elapsed "$ts") s, total $(elapsed "$t0") s)" >&2
echo "postgresql+asyncpg://$ROLE:$PASSWORD@$HOST:$PORT/$DB"
