#!/usr/bin/env bash
# Start (or restart) a worker node and join the head at $RAY_HEAD_IP (set by the autoscaler). Same for
# cluster.yaml and cluster-onprem.yaml.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export MFCON_NODE_IP=${MFCON_NODE_IP:-$(hostname -I | awk '{print $1}')}
bash "$here/node_env.sh" "${RAY_HEAD_IP:?the autoscaler sets RAY_HEAD_IP}"
source ~/mfcon.env
ray stop
# The dashboard agent's HTTP port is picked free (0): the job API finds it through the GCS, and a fixed 52365
# collides with any other Ray on the machine.
# --temp-dir: this node's own (a worker without it takes the head's path, which may not be writable here).
ray start --address="$RAY_HEAD_IP:6379" --node-ip-address="$MFCON_NODE_IP" --dashboard-agent-listen-port=0 \
    --temp-dir="${TMPDIR:-/tmp}/ray" --disable-usage-stats
setsid nohup bash "$here/worker_watch.sh" "$RAY_HEAD_IP" >> ~/worker-watch.log 2>&1 < /dev/null &
