#!/usr/bin/env bash
# Cancel every job and stop the one-node cluster started by start.sh (by pidfile). State and logs
# stay, so job ids keep counting up. Usage: bash slurm/local/stop.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
run=/run/slurm-local
. "$here/daemons.sh"
if running "$run/slurmctld.pid"; then
  jobs="$(squeue -h -o %i 2>/dev/null || true)"
  if [[ -n "$jobs" ]]; then
    scancel $jobs || true
    for _ in $(seq 60); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.5; done
  fi
fi
stop_pidfile "$run/slurmd.pid"
stop_pidfile "$run/slurmctld.pid"
stop_pidfile /run/munge/munged.pid
echo "local SLURM stopped"
