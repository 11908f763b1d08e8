#!/usr/bin/env bash
# Root's part of the head's set-up (setup_node.sh head runs it with sudo -n, or directly when already root):
#
#   head_root.sh <ray user> <source tree> <python3> [prebuilt venv]
#
# - PostgreSQL's server binaries (Debian/Ubuntu: postgresql) when missing;
# - the tracking's system user (head_common.sh: mfcon-db) and its home, the data folder: owned by it, 0700. On
#   cluster.yaml the folder is the host's, mounted into a container whose user may get another uid: chown again;
# - the head's runtime in /opt/mfcon/venv and the tracking.sh that runs it, both root's: the Ray user runs the
#   same code (its jobs use this venv) but cannot change what the tracking user runs;
# - one sudo rule: the Ray user may run that tracking.sh as the tracking user, nothing else as it.
set -euo pipefail
ray_user=${1:?usage: head_root.sh <ray user> <source tree> <python3> [prebuilt venv]}
src=${2:?usage: head_root.sh <ray user> <source tree> <python3> [prebuilt venv]}
python=${3:?usage: head_root.sh <ray user> <source tree> <python3> [prebuilt venv]}
source "$src/cluster/head_common.sh"
user=$MFCON_TRACKING_USER
db=$MFCON_DB_DIR

if ! ls -d /usr/lib/postgresql/*/bin > /dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null
fi
id -u "$user" > /dev/null 2>&1 \
    || useradd --system --user-group --home-dir "$db" --no-create-home --shell /usr/sbin/nologin "$user"
mkdir -p "$db"
[ -z "$(find "$db" ! -user "$user" -print -quit)" ] || chown -R "$user:$user" "$db"
chmod 700 "$db"

install -d -o root -g root -m 755 "$MFCON_HEAD_DIR"
MFCON_PREBUILT_VENV=${4:-} bash "$src/cluster/runtime.sh" "$MFCON_HEAD_DIR/venv" "$src" "$python"
install -o root -g root -m 755 "$src/cluster/tracking.sh" "$src/cluster/head_common.sh" "$MFCON_HEAD_DIR/"

# sudo resets the environment: keep only the settings the server command is built from (tracking.sh checks
# each) and the object store's credentials it writes artifacts with (none on AWS: the instance profile).
rule=/etc/sudoers.d/mfcon-tracking
cat > "$rule.new" << RULE
# cluster/head_root.sh: $ray_user runs the head's tracking only through this script, as $user.
Defaults!$MFCON_HEAD_DIR/tracking.sh env_keep += "MFCON_NODE_IP MFCON_ARTIFACTS MFCON_MLFLOW_PORT MFCON_MLFLOW_WORKERS"
Defaults!$MFCON_HEAD_DIR/tracking.sh env_keep += "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN"
Defaults!$MFCON_HEAD_DIR/tracking.sh env_keep += "AWS_REGION AWS_DEFAULT_REGION AWS_ENDPOINT_URL MLFLOW_S3_ENDPOINT_URL"
Defaults!$MFCON_HEAD_DIR/tracking.sh env_keep += "AWS_EC2_METADATA_DISABLED"
$ray_user ALL=($user) NOPASSWD: $MFCON_HEAD_DIR/tracking.sh
RULE
chmod 440 "$rule.new"
visudo -cqf "$rule.new"
mv "$rule.new" "$rule"
