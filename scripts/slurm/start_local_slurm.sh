#!/usr/bin/env bash
# A single-node Slurm 22.05 for tests and CI (Debian packages, no systemd): install if needed, start
# munged, slurmctld and slurmd with scripts/slurm/slurm.conf.template, wait until the node is idle.
# Idempotent: a Slurm already answering is left as it is. Needs root. Stop it with stop_local_slurm.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state=/tmp/slurm

if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "local slurm: already running"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "local slurm: needs root (apt-get and the daemons)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null; }
fi

mkdir -p /run/munge /etc/slurm "$state"/{state,spool,log}
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; \
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done

sed "s/HOSTNAME/$(hostname -s)/g" "$here/slurm.conf.template" >/etc/slurm/slurm.conf
[ -f "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null || slurmctld -i
[ -f "$state/slurmd.pid" ] && kill -0 "$(cat "$state/slurmd.pid")" 2>/dev/null || slurmd
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "local slurm: running ($(sinfo -V), node $(hostname -s), partitions debug and high)"
        exit 0
    fi
    sleep 0.2
done
echo "local slurm: the node did not become idle; see $state/log/" >&2
exit 1
