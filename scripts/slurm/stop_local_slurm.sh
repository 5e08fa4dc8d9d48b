#!/usr/bin/env bash
# Stop what start_local_slurm.sh started (by the pids in its pid files); jobs still queued are cancelled.
set -uo pipefail
state=/tmp/slurm
command -v scancel >/dev/null && scancel --full --quiet --user "$(id -un)" 2>/dev/null
for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" /run/munge/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
rm -rf "$state"
echo "local slurm: stopped"
