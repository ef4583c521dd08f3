# Helpers sourced by start.sh and stop.sh: daemons are found by their pidfiles, never by name.
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
  local pidfile="$1" pid
  if running "$pidfile"; then
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
}

# The slurm.conf settings both test clusters share: no accounting or cgroups, quick scheduling,
# preemption by partition priority that requeues and sends the job's own signal (USR2).
test_cluster_settings() {
  cat <<'CONF'
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
CONF
}
