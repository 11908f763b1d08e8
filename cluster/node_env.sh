#!/usr/bin/env bash
# ~/mfcon.env: what every process on this node inherits (sourced before `ray start`, so the raylet, every trial
# and every job driver get it; login and interactive shells source it too).
#
#   node_env.sh <head ip>
set -euo pipefail
head_ip=${1:?usage: node_env.sh <head ip>}
venv=${MFCON_VENV:-$HOME/mfcon-venv}
cat > ~/mfcon.env << ENV
export PATH=$venv/bin:\$PATH
export MLFLOW_TRACKING_URI=http://$head_ip:${MFCON_MLFLOW_PORT:-5000}
# Ray token auth (~/.ray/auth_token, copied by file_mounts) for the raylet, drivers and \`ray job submit\`.
export RAY_AUTH_MODE=token
# Cold start: GPU workers start from 0 nodes. A trial's worker group waits for the autoscaler to boot a node,
# pull the image and install the lock (often 10+ minutes) instead of failing after Train's 60 s.
export RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=${MFCON_WORKER_GROUP_START_TIMEOUT_S:-1800}
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0
export RAY_USAGE_STATS_ENABLED=0
ENV
