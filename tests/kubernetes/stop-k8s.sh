#!/usr/bin/env bash
# Stops what start-k8s.sh started (kubelet first), removes the pod containers the kubelet
# left in Docker and unmounts the kubelet's mounts. Idempotent.
RUN=${RUN:-/tmp/ozfleet-k8s}
cd "$RUN" 2>/dev/null || exit 0
for component in kubelet sched kcm apiserver etcd; do
    [ -f "$component.pid" ] || continue
    pid=$(cat "$component.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$component.pid"
done
/usr/bin/docker ps -aq --filter name=k8s_ | xargs -r /usr/bin/docker rm -f >/dev/null 2>&1
mount | awk -v r="$RUN/kubelet" '$3 ~ "^"r {print $3}' | sort -r | xargs -r -n1 umount 2>/dev/null
true
