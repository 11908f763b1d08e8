#!/usr/bin/env bash
# Start (or restart: `ray up` again) the head: tracking first, then Ray. cluster.yaml and cluster-onprem.yaml
# run exactly this. The node takes no trials: 0 CPUs, 0 GPUs and 0 "memory" for tasks and actors, so trial
# drivers (which reserve memory) and Train workers (CPUs/GPUs) always go to worker nodes.
#
#   MFCON_ARTIFACTS=s3://bucket/mlflow bash ~/mfcon-studio/cluster/start_head.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export MFCON_NODE_IP=${MFCON_NODE_IP:-$(hostname -I | awk '{print $1}')}
db=${MFCON_DB_DIR:-$HOME/mfcon-db}
bash "$here/node_env.sh" "$MFCON_NODE_IP"
# Jobs on the head (the study driver logs every trial, promote moves `champion`) authenticate as the tracking
# server's admin. The password is read from its 0600 file when this is sourced and never written here; processes
# on worker nodes never talk to MLflow and get no credentials. docs/tracking_server.md: per-user accounts.
cat >> ~/mfcon.env << ENV
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD="\$(cat "$db/mlflow_admin_password")"
ENV
source ~/mfcon.env

touch "$db/ray-restarting"  # the tracking supervisor keeps the servers up while Ray restarts
trap 'rm -f "$db/ray-restarting"' EXIT
bash "$here/tracking.sh" start
ray stop
# The dashboard agent's HTTP port is picked free (0): the job API finds it through the GCS, and a fixed 52365
# collides with any other Ray on the machine.
ray start --head --node-ip-address="$MFCON_NODE_IP" --port=6379 --num-cpus=0 --num-gpus=0 --memory=0 \
    --dashboard-host="$MFCON_NODE_IP" --dashboard-agent-listen-port=0 --autoscaling-config="$HOME/ray_bootstrap_config.yaml" --disable-usage-stats
