#!/usr/bin/env bash
# Start (or restart: `ray up` again) the head: tracking first, then Ray. cluster.yaml and cluster-onprem.yaml
# run exactly this. The node takes no trials: 0 CPUs, 0 GPUs and 0 "memory" for tasks and actors, so trial
# drivers (which reserve memory) and Train workers (CPUs/GPUs) always go to worker nodes.
#
#   MFCON_ARTIFACTS=s3://bucket/mlflow bash ~/mfcon-studio/cluster/start_head.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/head_common.sh"
export MFCON_NODE_IP=${MFCON_NODE_IP:-$(hostname -I | awk '{print $1}')}
export MFCON_VENV=$MFCON_HEAD_DIR/venv  # root's runtime (setup_node.sh head)
bash "$here/node_env.sh" "$MFCON_NODE_IP"
# Jobs on the head (the study driver logs every trial, promote moves `champion`) sign in as the jobs' own MLflow
# account, not the admin: its password is copied once more from the tracking user into this user's 0600 file
# and read from there when mfcon.env is sourced. The admin's and PostgreSQL's passwords stay the tracking
# user's. Processes on worker nodes never talk to MLflow and get no credentials.
mkdir -p ~/.mfcon && chmod 700 ~/.mfcon
(umask 077 && tracking jobs-password > ~/.mfcon/mlflow_jobs_password.new)
mv ~/.mfcon/mlflow_jobs_password.new ~/.mfcon/mlflow_jobs_password
cat >> ~/mfcon.env << ENV
export MLFLOW_TRACKING_USERNAME=$MFCON_JOBS_ACCOUNT
export MLFLOW_TRACKING_PASSWORD="\$(cat ~/.mfcon/mlflow_jobs_password)"
ENV
source ~/mfcon.env

trap 'tracking ray-started' EXIT  # `start` keeps the servers up until then, while Ray restarts
tracking start "$(id -u)"
ray stop
# The dashboard agent's HTTP port is picked free (0): the job API finds it through the GCS, and a fixed 52365
# collides with any other Ray on the machine.
ray start --head --node-ip-address="$MFCON_NODE_IP" --port=6379 --num-cpus=0 --num-gpus=0 --memory=0 \
    --dashboard-host="$MFCON_NODE_IP" --dashboard-agent-listen-port=0 --autoscaling-config="$HOME/ray_bootstrap_config.yaml" --disable-usage-stats
