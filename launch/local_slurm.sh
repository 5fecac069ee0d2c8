#!/bin/bash
# A single-host SLURM (slurmctld + slurmd on this machine) for trying launch/slurm.py, and for
# tests/test_slurm.py. Installs Debian's slurm-wlm and munge when missing (needs root), writes its
# config and state under $1 (default /tmp/avgen-slurm) and prints the SLURM_CONF to export.
#
#   eval "$(launch/local_slurm.sh start)"     # exports SLURM_CONF; then sbatch/srun/squeue work
#   launch/local_slurm.sh stop
set -euo pipefail
ACTION="${1:-start}"
DIR="${2:-/tmp/avgen-slurm}"
CONF="$DIR/slurm.conf"

stop() {
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
}

if [ "$ACTION" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ]; then echo "slurm-wlm/munge missing and not root: cannot install" >&2; exit 3; fi
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -q slurm-wlm munge || (apt-get update -q && apt-get install -y -q slurm-wlm munge)) >"$DIR.apt.log" 2>&1 \
    || { echo "apt-get install slurm-wlm munge failed (see $DIR.apt.log)" >&2; exit 3; }
fi

mkdir -p "$DIR/state" "$DIR/spool"
HOST="$(hostname)"
CPUS="$(nproc --all)"  # not plain nproc: it follows OMP_NUM_THREADS
MEM_MB="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))"
cat > "$CONF" <<CONF
ClusterName=avgen-local
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

if ! pgrep -x munged >/dev/null; then
  [ -f /etc/munge/munge.key ] || (command -v mungekey >/dev/null && mungekey --create) || \
    (dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null && chmod 400 /etc/munge/munge.key)
  mkdir -p /run/munge
  munged --force >/dev/null 2>&1
fi
stop
export SLURM_CONF="$CONF"
slurmctld -f "$CONF"
slurmd -f "$CONF"
for _ in $(seq 1 30); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "export SLURM_CONF=$CONF"; exit 0; fi
  sleep 1
done
echo "SLURM did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
exit 4
