#!/usr/bin/env bash
# A two-node SLURM 22.05 cluster on one Debian machine (root), for multi-node tests on a laptop-like
# Linux box or a CI runner. Every daemon runs in its own network, UTS and mount namespaces:
#
#   ljctl  10.77.0.1   controller and login node (slurmctld, munged; bridges of both networks)
#   lj1    10.77.0.11  slurmd        data network: ib0 10.78.0.11
#   lj2    10.77.0.12  slurmd        data network: ib0 10.78.0.12
#
# The cluster has its own munge key and socket and starts job ids at 100000, and nothing listens in
# the root namespace, so the one-node cluster of start.sh (127.0.0.1) runs beside it. The shared
# file system is this machine's: both nodes see the same run directories. SlurmdTimeout is 20 s, so
# node faults resolve in seconds, not minutes.
#
#   bash slurm/local/two_nodes.sh start | stop | status
#   bash slurm/local/two_nodes.sh login CMD...      run CMD on the login node (sbatch, squeue, launch)
#   bash slurm/local/two_nodes.sh on NODE CMD...    run CMD on lj1 or lj2
#   bash slurm/local/two_nodes.sh crash NODE        SIGKILL every process of NODE (slurmd and tasks)
#   bash slurm/local/two_nodes.sh boot NODE         start NODE's slurmd again
#   bash slurm/local/two_nodes.sh cut NODE | restore NODE            all of NODE's links down / up
#   bash slurm/local/two_nodes.sh cut-data NODE | restore-data NODE  its data network (ib0) only
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
TWO=${TWO:-/run/slurm-two}
NODES=(lj1 lj2)
declare -A ADDR=([ljctl]=10.77.0.1 [lj1]=10.77.0.11 [lj2]=10.77.0.12)
CONF=$TWO/etc/slurm/slurm.conf
. "$here/daemons.sh"

pid_of() { running "$1" && cat "$1"; }

write_config() {
  install -d -m 0755 "$TWO/etc/slurm" "$TWO/spool" "$TWO/log" "$TWO/run" "$TWO/bin"
  printf '127.0.0.1 localhost\n%s ljctl\n%s lj1\n%s lj2\n' "${ADDR[ljctl]}" "${ADDR[lj1]}" "${ADDR[lj2]}" \
    > "$TWO/etc/hosts"
  local cpus; cpus="$(getconf _NPROCESSORS_ONLN)"
  cat > "$CONF" <<CONF
# two-node test cluster written by slurm/local/two_nodes.sh
ClusterName=two
FirstJobId=100000
SlurmctldHost=ljctl(${ADDR[ljctl]})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket=$TWO/munge/munge.socket.2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$TWO/spool/ctld
SlurmdSpoolDir=$TWO/spool/d-%n
SlurmctldPidFile=$TWO/run/slurmctld.pid
SlurmdPidFile=$TWO/run/slurmd-%n.pid
SlurmctldLogFile=$TWO/log/slurmctld.log
SlurmdLogFile=$TWO/log/slurmd-%n.log
$(test_cluster_settings)
SlurmdTimeout=20
NodeName=lj1 NodeAddr=${ADDR[lj1]} CPUs=$cpus RealMemory=4000 State=UNKNOWN
NodeName=lj2 NodeAddr=${ADDR[lj2]} CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=lj[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=lj[1-2] Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
  install -m 0755 "$here/sacct" "$TWO/bin/sacct"  # no slurmdbd here: the project's stand-in
  cat > "$TWO/bin/as_host" <<'SH'
#!/bin/bash
# as_host HOST CMD...: in fresh UTS and mount namespaces, become HOST with this cluster's files
set -e
hostname "$1"
mount --bind "$TWO/etc/hosts" /etc/hosts
mount --bind "$TWO/etc/slurm" /etc/slurm
shift
exec "$@"
SH
  chmod 0755 "$TWO/bin/as_host"
}

ns() { echo "lj-$1"; }  # network namespace of a host

network_up() {
  for h in ljctl "${NODES[@]}"; do ip netns add "$(ns "$h")"; ip -n "$(ns "$h")" link set lo up; done
  local ctl; ctl="$(ns ljctl)"
  ip -n "$ctl" link add br0 type bridge && ip -n "$ctl" addr add "${ADDR[ljctl]}/24" dev br0
  ip -n "$ctl" link add br1 type bridge  # the data network: no address on the login node
  ip -n "$ctl" link set br0 up && ip -n "$ctl" link set br1 up
  for h in "${NODES[@]}"; do
    ip -n "$ctl" link add "e-$h" type veth peer name eth0 netns "$(ns "$h")"
    ip -n "$ctl" link add "i-$h" type veth peer name ib0 netns "$(ns "$h")"
    ip -n "$ctl" link set "e-$h" master br0 up && ip -n "$ctl" link set "i-$h" master br1 up
    ip -n "$(ns "$h")" addr add "${ADDR[$h]}/24" dev eth0 && ip -n "$(ns "$h")" link set eth0 up
    ip -n "$(ns "$h")" addr add "${ADDR[$h]/10.77/10.78}/24" dev ib0 && ip -n "$(ns "$h")" link set ib0 up
  done
}

in_host() {  # start a daemon as host $1 (nsenter keeps /sys as it is: slurmd needs its cgroup mounts)
  local h=$1; shift
  TWO=$TWO setsid nsenter --net="/run/netns/$(ns "$h")" unshare --uts --mount --propagation private \
    "$TWO/bin/as_host" "$h" "$@" </dev/null >>"$TWO/log/start-$h.log" 2>&1
}

munge_up() {
  install -d -o munge -g munge -m 0755 "$TWO/munge"
  [[ -s "$TWO/munge/munge.key" ]] || dd if=/dev/urandom bs=1 count=1024 of="$TWO/munge/munge.key" status=none
  chown munge:munge "$TWO/munge/munge.key" && chmod 0400 "$TWO/munge/munge.key"
  running "$TWO/munge/munged.pid" && return
  ip netns exec "$(ns ljctl)" runuser -u munge -- /usr/sbin/munged --force --socket="$TWO/munge/munge.socket.2" \
    --key-file="$TWO/munge/munge.key" --pid-file="$TWO/munge/munged.pid" --log-file="$TWO/munge/munged.log" \
    --seed-file="$TWO/munge/munged.seed"
  for _ in $(seq 50); do [[ -S "$TWO/munge/munge.socket.2" ]] && return; sleep 0.1; done
}

# the nodes' jobs run at nice 10: on a shared box (the test suite's other worker) they take spare CPU
boot() { running "$TWO/run/slurmd-$1.pid" || in_host "$1" nice -n 10 /usr/sbin/slurmd -f "$CONF"; }

login() {
  local pid; pid="$(pid_of "$TWO/run/slurmctld.pid")" || { echo "two-node cluster not running" >&2; return 1; }
  PATH="$TWO/bin:$PATH" nsenter -t "$pid" -n -u -m --wd="$PWD" -- "$@"
}

on() {
  local h=$1 pid; shift
  pid="$(pid_of "$TWO/run/slurmd-$h.pid")" || { echo "$h: slurmd not running" >&2; return 1; }
  PATH="$TWO/bin:$PATH" nsenter -t "$pid" -n -u -m --wd="$PWD" -- "$@"
}

wait_idle() {
  for _ in $(seq 240); do
    [[ "$(login sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | grep -cE ' (idle|mix|alloc)$')" == 2 ]] && return
    sleep 0.25
  done
  login sinfo -N >&2; return 1
}

start() {
  bash "$here/install.sh"
  write_config
  ip netns list | grep -q "^$(ns ljctl)\b" || network_up
  munge_up
  running "$TWO/run/slurmctld.pid" || in_host ljctl /usr/sbin/slurmctld -f "$CONF"
  for _ in $(seq 50); do running "$TWO/run/slurmctld.pid" && break; sleep 0.1; done
  for h in "${NODES[@]}"; do boot "$h"; done
  wait_idle
  login sinfo -N
}

kill_namespace() {  # every process in host $1's network namespace, by pid
  ip netns list | grep -q "^$(ns "$1")\b" || return 0
  local pids; pids="$(ip netns pids "$(ns "$1")" | tr '\n' ' ')"
  [[ -n "${pids// }" ]] && kill "-${2:-TERM}" $pids 2>/dev/null || true
}

stop() {
  if running "$TWO/run/slurmctld.pid"; then
    local jobs; jobs="$(login squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)"
    if [[ -n "${jobs// }" ]]; then
      login scancel $jobs || true
      for _ in $(seq 40); do [[ -z "$(login squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
  fi
  for h in "${NODES[@]}" ljctl; do kill_namespace "$h"; done
  sleep 1
  for h in "${NODES[@]}" ljctl; do kill_namespace "$h" KILL; done
  for h in "${NODES[@]}" ljctl; do ip netns del "$(ns "$h")" 2>/dev/null || true; done  # links go with them
  rm -f "$TWO"/run/*.pid "$TWO/munge/munged.pid"
  echo "two-node SLURM stopped"
}

command="${1:-status}"; shift || true
case "$command" in
  start) start ;;
  stop) stop ;;
  status) ip netns list; login sinfo -N; login squeue ;;
  login) login "$@" ;;
  on) on "$@" ;;
  crash) kill_namespace "$1" KILL; rm -f "$TWO/run/slurmd-$1.pid" ;;
  boot) boot "$1" ;;  # SLURM returns the node to service when it sees fit (ReturnToService=2)
  cut) ip -n "$(ns ljctl)" link set "e-$1" down; ip -n "$(ns ljctl)" link set "i-$1" down ;;
  restore) ip -n "$(ns ljctl)" link set "e-$1" up; ip -n "$(ns ljctl)" link set "i-$1" up ;;
  cut-data) ip -n "$(ns ljctl)" link set "i-$1" down ;;
  restore-data) ip -n "$(ns ljctl)" link set "i-$1" up ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
