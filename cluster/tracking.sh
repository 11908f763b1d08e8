#!/usr/bin/env bash
# The head's tracking: PostgreSQL (Unix socket only, no TCP) and `mfcon tracking-server`, kept by one supervisor,
# all running as the tracking user (head_common.sh: mfcon-db), never as the user that runs Ray. head_root.sh
# installs this file root-owned in /opt/mfcon; the Ray user runs it only as `tracking <command>` (sudo -u).
#
#   tracking.sh init            set-up: initdb once; passwords are generated once and kept WITH the data
#   tracking.sh start RAY_UID   start the supervisor, or hand it a changed server command (it restarts the server);
#                               make sure the jobs' MLflow account exists (head_common.sh: ray-jobs)
#   tracking.sh ray-started     start_head.sh's Ray is up again (see supervise)
#   tracking.sh jobs-password   print the jobs account's password (start_head.sh keeps it in the Ray user's file)
#   tracking.sh stop            stop the supervisor, the server and PostgreSQL
#   tracking.sh status          exit 0 when the supervisor runs
#   tracking.sh supervise       (the supervisor itself) restarts a dead server or database; ends both once Ray
#                               (gcs_server of RAY_UID) has stopped on this node (`ray down`), but not while
#                               start_head.sh restarts Ray (`start` .. `ray-started`, at most 5 minutes)
#
# Everything lives in $MFCON_DB_DIR (/var/lib/mfcon-db, 0700; on cluster.yaml a host folder, so it outlives the
# container): pgdata/  pg_password  mlflow_admin_password  mlflow_jobs_password (0600)  mlflow-auth/  run/ (socket)
# supervisor.pid  mlflow-server.pid (written by the server's own shell, which then execs the server: the pid is
# the server's)  ray-uid  *.log
# Settings (from the environment of start_head.sh, each checked: they become the server's command line):
# MFCON_NODE_IP, MFCON_ARTIFACTS (an object store), MFCON_MLFLOW_PORT (5000), MFCON_MLFLOW_WORKERS (2).
set -euo pipefail
source "$(dirname "$0")/head_common.sh"
db=$MFCON_DB_DIR
venv=$MFCON_HEAD_DIR/venv
export HOME=$db
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -V | tail -1)

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }
pg() { "$pg_bin/pg_ctl" -D "$db/pgdata" "$@"; }
secret() { [ -s "$1" ] || (umask 077 && "$venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$1"); }

init() {
    mkdir -p "$db/run" && chmod 700 "$db"
    # The tracking server's admin and the jobs' account (MLflow basic auth): generated once, kept with the data.
    secret "$db/mlflow_admin_password"
    secret "$db/mlflow_jobs_password"
    if [ -f "$db/pgdata/PG_VERSION" ]; then
        [ -s "$db/pg_password" ] || { echo "$db/pgdata exists but $db/pg_password is missing: restore it" >&2; exit 1; }
        return
    fi
    secret "$db/pg_password"
    "$pg_bin/initdb" -D "$db/pgdata" -U mfcon --pwfile="$db/pg_password" --auth=scram-sha-256 -E UTF8 > "$db/initdb.log"
}

check_settings() {
    # They reach a shell command line as the tracking user: nothing but an address, numbers and an object store.
    [[ ${MFCON_NODE_IP:?} =~ ^[0-9A-Fa-f.:]+$ ]] || { echo "MFCON_NODE_IP $MFCON_NODE_IP: not an IP address" >&2; exit 2; }
    [[ ${MFCON_MLFLOW_PORT:-5000} =~ ^[0-9]+$ && ${MFCON_MLFLOW_WORKERS:-2} =~ ^[0-9]+$ ]] \
        || { echo "MFCON_MLFLOW_PORT / MFCON_MLFLOW_WORKERS: numbers only" >&2; exit 2; }
    [[ ${MFCON_ARTIFACTS:?set MFCON_ARTIFACTS, e.g. s3://bucket/mlflow} =~ ^[a-z0-9]+://[A-Za-z0-9._/-]+$ \
        && $MFCON_ARTIFACTS != file:* ]] \
        || { echo "MFCON_ARTIFACTS $MFCON_ARTIFACTS: give an object store, e.g. s3://bucket/mlflow" >&2; exit 2; }
}

server_command() {
    # MLflow basic auth: anonymous clients may not write (default permission READ); the admin's password is read
    # from its 0600 file beside pg_password, never from argv; users and permissions live in the same database.
    echo "$venv/bin/python -m mfcon.cli.tracking_server" \
        "--auth --auth-dir $db/mlflow-auth --admin-password-file $db/mlflow_admin_password" \
        "--backend-store-uri postgresql://mfcon@/mlflow?host=$db/run" \
        "--artifacts-destination ${MFCON_ARTIFACTS:?set MFCON_ARTIFACTS, e.g. s3://bucket/mlflow}" \
        "--host ${MFCON_NODE_IP:?} --port ${MFCON_MLFLOW_PORT:-5000} --workers ${MFCON_MLFLOW_WORKERS:-2}"
}

start_postgres() {
    pg status > /dev/null 2>&1 && return
    pg -l "$db/postgres.log" -w -o "-c listen_addresses='' -k $db/run" start > /dev/null
    PGPASSWORD=$(cat "$db/pg_password") "$pg_bin/psql" -h "$db/run" -U mfcon -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
        || PGPASSWORD=$(cat "$db/pg_password") "$pg_bin/createdb" -h "$db/run" -U mfcon mlflow
}

start_server() {
    # The server's shell writes its own pid, then becomes the server (exec): a process group of its own.
    # MLflow answers 403 to a Host outside its allowed list; its default covers 127.0.0.1 and RFC 1918, not e.g.
    # another loopback address (mfcon passes --allowed-hosts itself for private addresses, which wins).
    local ip=$MFCON_NODE_IP
    MLFLOW_SERVER_ALLOWED_HOSTS="$ip,$ip:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*" \
    PGPASSWORD=$(cat "$db/pg_password") setsid bash -c "echo \$\$ > '$db/mlflow-server.pid'; exec $1" \
        >> "$db/mlflow-server.log" 2>&1 < /dev/null &
}

stop_server() {
    alive "$db/mlflow-server.pid" || return 0
    local pid
    pid=$(cat "$db/mlflow-server.pid")
    kill -TERM -- "-$pid" 2> /dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2> /dev/null || true
    rm -f "$db/mlflow-server.pid"
}

supervise() {
    echo $$ > "$db/supervisor.pid"
    trap 'stop_server; pg stop -m fast > /dev/null 2>&1 || true; rm -f "$db/supervisor.pid"; exit 0' TERM INT
    local running="" gone=0 wanted
    while :; do
        start_postgres
        wanted=$(cat "$db/mlflow-server.cmd")
        if [ "$wanted" != "$running" ] || ! alive "$db/mlflow-server.pid"; then
            stop_server
            echo "$(date -u +%FT%TZ) supervisor: starting the tracking server" >> "$db/mlflow-server.log"
            start_server "$wanted"
            running=$wanted
        fi
        # Ray runs as another user: its GCS is what says Ray is up on this node.
        if pgrep -u "$(cat "$db/ray-uid")" -x gcs_server > /dev/null \
            || [ -n "$(find "$db" -maxdepth 1 -name ray-restarting -mmin -5)" ]; then
            gone=0
        else
            gone=$((gone + 1))
        fi
        if [ "$gone" -ge 3 ]; then  # Ray stopped on the head (`ray down`) and nothing is restarting it
            echo "$(date -u +%FT%TZ) supervisor: Ray stopped on this node, stopping" >> "$db/mlflow-server.log"
            stop_server; pg stop -m fast > /dev/null 2>&1 || true; rm -f "$db/supervisor.pid"; exit 0
        fi
        sleep 5 & wait $!
    done
}

url() { echo "http://${MFCON_NODE_IP}:${MFCON_MLFLOW_PORT:-5000}"; }

wait_healthy() {
    for _ in $(seq 120); do
        "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$(url)/health', timeout=2)" 2> /dev/null && return 0
        sleep 1
    done
    echo "tracking server not healthy at $(url); see $db/mlflow-server.log" >&2
    tail -20 "$db/mlflow-server.log" >&2
    return 1
}

jobs_account() {
    # As the admin, through MLflow's auth REST API: a non-admin account; it MANAGEs what it creates.
    "$venv/bin/python" -c 'import sys; from mfcon.tracking.server_auth import ensure_user; print(ensure_user(*sys.argv[1:]))' \
        "$(url)" "$MFCON_JOBS_ACCOUNT" "$db/mlflow_jobs_password" "$db/mlflow_admin_password" > /dev/null
}

[ "$(id -un)" = "$MFCON_TRACKING_USER" ] || { echo "$0 runs as $MFCON_TRACKING_USER (head_common.sh: tracking)" >&2; exit 1; }
case "${1:-}" in
    init) init ;;
    start)
        [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "usage: $0 start <uid of the Ray user>" >&2; exit 2; }
        check_settings
        echo "$2" > "$db/ray-uid"
        touch "$db/ray-restarting"  # the supervisor keeps the servers up while start_head.sh restarts Ray
        new=$(server_command)
        changed=1
        [ "$(cat "$db/mlflow-server.cmd" 2> /dev/null)" = "$new" ] && changed=0
        echo "$new" > "$db/mlflow-server.cmd"
        if ! alive "$db/supervisor.pid"; then
            setsid nohup bash "$0" supervise >> "$db/supervisor.log" 2>&1 < /dev/null &
        elif [ "$changed" = 1 ]; then
            sleep 6  # the supervisor sees the new command within 5 s and restarts the server
        fi
        wait_healthy
        jobs_account
        ;;
    ray-started) rm -f "$db/ray-restarting" ;;
    jobs-password) cat "$db/mlflow_jobs_password" ;;
    stop)
        if alive "$db/supervisor.pid"; then
            pid=$(cat "$db/supervisor.pid"); kill -TERM "$pid"
            for _ in $(seq 60); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
        fi
        ;;
    status) alive "$db/supervisor.pid" ;;
    supervise) supervise ;;
    *) echo "usage: $0 init|start RAY_UID|ray-started|jobs-password|stop|status|supervise" >&2; exit 2 ;;
esac
