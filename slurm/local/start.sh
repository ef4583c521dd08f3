#!/usr/bin/env bash
# Install (if needed), configure and start a one-node SLURM 22.05 cluster on Debian without systemd,
# then wait until the node is idle. Idempotent: a rerun with the cluster up is a no-op, a changed
# slurm.conf restarts the daemons. Needs root. Usage: bash slurm/local/start.sh
#
# Partitions: `debug` (default) is preemptible by `high`. The settings below that differ from the
# defaults make requeue and preemption fast and visible to the job:
#   AuthInfo=cred_expire=5 + bf_interval=1,sched_interval=2: a requeued job restarts in ~7 s, not ~2 min
#   SlurmctldParameters=preempt_send_user_signal: preemption sends the job's --signal (USR2), not SIGTERM
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/install.sh"

host="$(hostname -s)"
conf=/etc/slurm/slurm.conf
spool=/var/spool/slurm-local
logs=/var/log/slurm-local
run=/run/slurm-local
. "$here/daemons.sh"
install -d -m 0755 /etc/slurm "$spool/ctld" "$spool/d" "$logs" "$run"

cpus="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it honours OMP_NUM_THREADS
mem_mb=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
cat > "$conf.new" <<CONF
# one-node test cluster written by slurm/local/start.sh
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=${spool}/ctld
SlurmdSpoolDir=${spool}/d
SlurmctldPidFile=${run}/slurmctld.pid
SlurmdPidFile=${run}/slurmd.pid
SlurmctldLogFile=${logs}/slurmctld.log
SlurmdLogFile=${logs}/slurmd.log
$(test_cluster_settings)
SlurmdTimeout=300
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=${host} Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
if cmp -s "$conf.new" "$conf"; then
  rm -f "$conf.new"
else
  mv "$conf.new" "$conf"
  stop_pidfile "$run/slurmd.pid"
  stop_pidfile "$run/slurmctld.pid"
fi

running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged --force
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
running "$run/slurmctld.pid" || /usr/sbin/slurmctld -f "$conf"
running "$run/slurmd.pid" || /usr/sbin/slurmd -f "$conf"

for _ in $(seq 60); do
  state="$(sinfo -h -N -n "$host" -p debug -o %t 2>/dev/null || true)"
  [[ "$state" == idle || "$state" == mix || "$state" == alloc ]] && break
  [[ "$state" == down* || "$state" == drain* ]] && scontrol update nodename="$host" state=resume || true
  sleep 0.5
done
sinfo
state="$(sinfo -h -N -n "$host" -p debug -o %t)"
[[ "$state" == idle || "$state" == mix || "$state" == alloc ]] || {
  echo "node $host is '$state', not usable; see $logs/slurmctld.log and $logs/slurmd.log" >&2
  exit 1
}
