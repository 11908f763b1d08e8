# The head's tracking user and folders (sourced by setup_node.sh, start_head.sh, head_root.sh, tracking.sh).
#
# PostgreSQL and the MLflow server run as their own system user, not the user that runs Ray: its data folder
# and secrets (pg_password, mlflow_admin_password) are that user's alone (0700 / 0600), and the server's code
# is root's (/opt/mfcon), so no Ray job can read the secrets, the server's environment or change what it runs.
MFCON_TRACKING_USER=mfcon-db
MFCON_DB_DIR=/var/lib/mfcon-db  # the tracking user's home; on cluster.yaml a host folder (outlives the container)
MFCON_HEAD_DIR=/opt/mfcon       # root-owned: the head's venv and the tracking.sh that the Ray user may run
MFCON_JOBS_ACCOUNT=ray-jobs     # the MLflow account of jobs on the head (not the admin)

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

# The one way in for the Ray user: the installed (root-owned) tracking.sh, as the tracking user.
tracking() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$MFCON_TRACKING_USER" -- "$MFCON_HEAD_DIR/tracking.sh" "$@"
    else
        sudo -n -u "$MFCON_TRACKING_USER" "$MFCON_HEAD_DIR/tracking.sh" "$@"
    fi
}
