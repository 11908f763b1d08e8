#!/usr/bin/env bash
# The pinned runtime in one venv: exactly requirements.lock (versions and hashes, the file CI installs), then this
# project, non-editable, from the tree `ray up` shipped (file_mounts), so the job driver and every trial import
# the same mfcon. setup_node.sh runs it as the node's user for ~/mfcon-venv on workers, and as root (head_root.sh)
# for the head's /opt/mfcon/venv, which the tracking server runs and the Ray user must not be able to change.
#
#   runtime.sh <venv> <source tree> [python3]
#
# MFCON_PREBUILT_VENV: an existing venv on the node that already has exactly the locked versions (checked by
# cluster/lock_check.py) is reused instead of downloading the lock again (a lab's node image, CI's venv).
set -euo pipefail
venv=${1:?usage: runtime.sh <venv> <source tree> [python3]}
src=${2:?usage: runtime.sh <venv> <source tree> [python3]}
lock=$src/requirements.lock

base=${3:-python3}
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
