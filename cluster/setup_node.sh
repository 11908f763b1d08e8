#!/usr/bin/env bash
# Set-up of every node, head and workers alike, for cluster.yaml (AWS) and cluster-onprem.yaml (your machines).
#
#   bash ~/mfcon-studio/cluster/setup_node.sh head|worker
#
# The runtime is pinned (cluster/runtime.sh: exactly requirements.lock, then this project as shipped). A worker
# gets it in ~/mfcon-venv, as its own user. The head needs root once per `ray up` (sudo -n: cloud images give the
# ssh user passwordless sudo; none when this already runs as root) for cluster/head_root.sh: the tracking's own
# system user and data folder, the runtime in root-owned /opt/mfcon/venv and one sudo rule; then PostgreSQL's
# initdb runs as the tracking user (cluster/tracking.sh init). A node with NVIDIA GPUs must have a driver for the
# lock's torch.
set -euo pipefail
role=${1:?usage: setup_node.sh head|worker}
src=${MFCON_SRC:-$HOME/mfcon-studio}
source "$src/cluster/head_common.sh"

# torch 2.11.0 from PyPI (the lock's) is a CUDA 13.0 build: NVIDIA driver >= 580 on the host.
if command -v nvidia-smi > /dev/null; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
    if [ "${driver%%.*}" -lt 580 ]; then
        echo "NVIDIA driver $driver is too old for the locked torch (CUDA 13.0 build needs >= 580): use the AMI named in cluster.yaml" >&2
        exit 1
    fi
fi

if [ "$role" = head ]; then
    venv=$MFCON_HEAD_DIR/venv
    as_root bash "$src/cluster/head_root.sh" "$(id -un)" "$src" "$(command -v python3)" "${MFCON_PREBUILT_VENV:-}"
else
    venv=${MFCON_VENV:-$HOME/mfcon-venv}
    bash "$src/cluster/runtime.sh" "$venv" "$src"
fi

# Login shells (Ray runs every command in one) and interactive shells get the venv and the node's settings.
grep -q 'mfcon.env' ~/.bashrc 2> /dev/null || echo 'test -f ~/mfcon.env && source ~/mfcon.env' >> ~/.bashrc
grep -q 'mfcon.env' ~/.profile 2> /dev/null || echo 'test -f ~/mfcon.env && source ~/mfcon.env' >> ~/.profile
test -f ~/mfcon.env || echo "export PATH=$venv/bin:\$PATH" > ~/mfcon.env

if [ "$role" = head ]; then
    tracking init
fi
