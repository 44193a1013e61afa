#!/usr/bin/env bash
# A real one-machine SLURM for tests: Debian's slurm-wlm + munge, one node, one partition.
#
#   bash tests/slurm/cluster.sh start    # install when missing, start, wait until the node is idle
#   bash tests/slurm/cluster.sh stop     # stop exactly the daemons `start` started
#   bash tests/slurm/cluster.sh status
#   eval "$(bash tests/slurm/cluster.sh env)"   # SLURM_CONF for sbatch/squeue/sinfo in your shell
#
# Needs root (apt-get, munge key, daemons). The config lives in $STATE, never in /etc/slurm,
# so a machine that already has a SLURM keeps its own; clients find ours through SLURM_CONF.
# Both commands are idempotent; a fresh start begins with an empty queue. Exit code 3 = cannot run here (not root, no apt-get, no packages).
set -euo pipefail

STATE=${SLURM_TEST_DIR:-/tmp/vae-harness-slurm}
WAIT_S=${SLURM_WAIT_S:-60}
CONF=$STATE/slurm.conf
NODE=$(hostname -s)

log() { echo "[cluster] $*" >&2; }
cannot() { log "cannot run: $*"; exit 3; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || cannot "not root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || cannot "no apt-get"
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >"$STATE/apt.log" 2>&1 ||
    { apt-get update -q >>"$STATE/apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$STATE/apt.log" 2>&1; } ||
    cannot "apt-get install failed (see $STATE/apt.log)"
}

start_munge() {
  # A munged that is already running (the machine's own) is used as it is, and never stopped.
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then return; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file "/run/munge/munged.pid"
  cp /run/munge/munged.pid "$STATE/munged.pid" # ours: `stop` ends it
}

write_conf() {
  mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log"
  # getconf, not nproc: nproc obeys OMP_NUM_THREADS, and tests run with OMP_NUM_THREADS=1.
  cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster.
ClusterName=vaeharness
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# Short timers so tests do not wait on them.
MinJobAge=300
KillWait=30
SchedulerParameters=sched_interval=2
NodeName=$NODE CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=$(($(free -m | awk '/^Mem:/{print $2}') * 3 / 4)) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
  mkdir -p "$STATE"
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then log "already running"; cmd_env; return; fi
  install
  start_munge
  write_conf
  export SLURM_CONF=$CONF
  # -c: a test cluster starts with an empty queue (no jobs recovered from an earlier run)
  alive "$STATE/slurmctld.pid" || slurmctld -c -f "$CONF"
  alive "$STATE/slurmd.pid" || slurmd -f "$CONF"
  local t=0
  until [[ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" =~ ^(idle|mixed)$ ]]; do
    t=$((t + 1))
    [ $t -le "$WAIT_S" ] || { log "node not up after ${WAIT_S}s: $(sinfo 2>&1 | tail -1)"; exit 1; }
    sleep 1
  done
  # Idle is not yet schedulable: run one tiny job step before saying the cluster is up.
  timeout "$WAIT_S" srun -N1 -n1 true || { log "a test job step did not run within ${WAIT_S}s"; exit 1; }
  log "node $NODE up, a job step ran"
  cmd_env
}

cmd_stop() {
  # Only the daemons this script started (their pid files in $STATE), one by one.
  for d in slurmd slurmctld munged; do
    if alive "$STATE/$d.pid"; then
      local pid; pid=$(cat "$STATE/$d.pid")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      log "stopped $d ($pid)"
    fi
    rm -f "$STATE/$d.pid"
  done
}

cmd_status() {
  for d in munged slurmctld slurmd; do
    if alive "$STATE/$d.pid"; then echo "$d running ($(cat "$STATE/$d.pid"))"; else echo "$d not started here"; fi
  done
  if [ -f "$CONF" ]; then SLURM_CONF=$CONF sinfo 2>&1 || true; fi
}

cmd_env() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
