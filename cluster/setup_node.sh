#!/usr/bin/env bash
# Set-up of every node, head and workers alike, for cluster.yaml (AWS) and cluster-onprem.yaml (your machines).
#
#   bash ~/mfcon-studio/cluster/setup_node.sh head|worker
#
# The runtime is pinned: a venv (~/mfcon-venv) with exactly requirements.lock (versions and hashes, the file CI
# installs), then this project, non-editable, from the tree `ray up` shipped (file_mounts), so the job driver
# and every trial import the same mfcon. A node with NVIDIA GPUs must have a driver for the lock's torch.
# MFCON_PREBUILT_VENV: an existing venv on the node that already has exactly the locked versions (checked by
# cluster/lock_check.py) is reused instead of downloading the lock again (a lab's node image, CI's venv).
set -euo pipefail
role=${1:?usage: setup_node.sh head|worker}
src=${MFCON_SRC:-$HOME/mfcon-studio}
venv=${MFCON_VENV:-$HOME/mfcon-venv}
lock=$src/requirements.lock

# torch 2.11.0 from PyPI (the lock's) is a CUDA 13.0 build: NVIDIA driver >= 580 on the host.
if command -v nvidia-smi > /dev/null; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
    if [ "${driver%%.*}" -lt 580 ]; then
        echo "NVIDIA driver $driver is too old for the locked torch (CUDA 13.0 build needs >= 580): use the AMI named in cluster.yaml" >&2
        exit 1
    fi
fi

base=python3
prebuilt=${MFCON_PREBUILT_VENV:-}
if [ -n "$prebuilt" ] && "$prebuilt/bin/python" "$src/cluster/lock_check.py" "$lock"; then
    base=$("$prebuilt/bin/python" -c 'import sys; print(sys._base_executable)')
else
    prebuilt=
fi
# Reusing: no pip or setuptools of the venv's own (they would shadow the locked ones the reused env provides).
test -x "$venv/bin/python" || "$base" -m venv ${prebuilt:+--without-pip} "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp=$(sha256sum "$lock" | cut -c1-16)
if [ "$(cat "$venv/.mfcon-lock" 2> /dev/null)" != "$stamp" ]; then
    if [ -n "$prebuilt" ]; then
        echo "reusing $prebuilt: it has exactly the locked versions"
        "$prebuilt/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/mfcon-prebuilt.pth"
    else
        rm -f "$site/mfcon-prebuilt.pth"
        "$venv/bin/python" -m pip install -q --require-hashes --no-deps -r "$lock"
    fi
    echo "$stamp" > "$venv/.mfcon-lock"
fi
if [ -n "$prebuilt" ]; then  # the reused env's commands, run by this venv's interpreter
    for cmd in ray mlflow; do
        printf '#!%s\nimport sys\nfrom importlib.metadata import entry_points\nsys.exit(entry_points(group="console_scripts")["%s"].load()())\n' \
            "$venv/bin/python" "$cmd" > "$venv/bin/$cmd"
        chmod +x "$venv/bin/$cmd"
    done
fi
# This project as shipped by `ray up` (not editable: a later rsync cannot change a running cluster's code).
if ! out=$("$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$src" 2>&1); then
    echo "$out" >&2
    exit 1
fi
"$venv/bin/python" -c 'import mfcon, ray, torch; print("runtime:", mfcon.__file__, "ray", ray.__version__, "torch", torch.__version__)'

# Login shells (Ray runs every command in one) and interactive shells get the venv and the node's settings.
grep -q 'mfcon.env' ~/.bashrc 2> /dev/null || echo 'test -f ~/mfcon.env && source ~/mfcon.env' >> ~/.bashrc
grep -q 'mfcon.env' ~/.profile 2> /dev/null || echo 'test -f ~/mfcon.env && source ~/mfcon.env' >> ~/.profile
test -f ~/mfcon.env || echo "export PATH=$venv/bin:\$PATH" > ~/mfcon.env

if [ "$role" = head ]; then
    bash "$src/cluster/tracking.sh" init
fi
