#!/usr/bin/env bash
# Started by start_worker.sh: stops Ray on this worker once its head has been unreachable for 30 s.
# Ray's local provider (cluster-onprem.yaml) stops only the head at `ray down`; a worker raylet then exits on
# its own, but its log monitor stays behind. A restarted head (`ray up` again) is a new cluster the old worker
# cannot rejoin either; the autoscaler starts it again.
#
#   worker_watch.sh <head ip>
set -uo pipefail
head_ip=${1:?usage: worker_watch.sh <head ip>}
pidfile=~/.mfcon-worker-watch.pid
test -s "$pidfile" && kill "$(cat "$pidfile")" 2> /dev/null
echo $$ > "$pidfile"
misses=0
while [ "$misses" -lt 6 ]; do
    sleep 5
    if (exec 3<> "/dev/tcp/$head_ip/6379") 2> /dev/null; then misses=0; else misses=$((misses + 1)); fi
done
source ~/mfcon.env
echo "$(date -u +%FT%TZ) head $head_ip unreachable for 30 s: ray stop"
ray stop --force
rm -f "$pidfile"
