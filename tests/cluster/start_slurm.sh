#!/usr/bin/env bash
# A one-node SLURM on this machine for the cluster tests (tests/test_slurm.py): Debian's slurm-wlm and
# munge, started by hand (no systemd, no cgroups). Idempotent: a running cluster with this config is left
# as it is (a second or so). `--install` installs the packages first where they are missing (root, apt).
# Exit status 77: this machine cannot run it (the reason on stderr); the tests skip with that reason.
# No accounting storage: sacct fails, and submitit says so at every poll ("Bypassing sacct error") and goes on.
set -euo pipefail

cannot() { echo "cannot start SLURM: $*" >&2; exit 77; }

[ "$(id -u)" = 0 ] || cannot "not root (munged, slurmctld and slurmd are started as root)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "${1:-}" = --install ] || cannot "slurm-wlm and munge are not installed (tests/cluster/start_slurm.sh --install)"
    command -v apt-get >/dev/null || cannot "no apt-get to install slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
conf=/etc/slurm/slurm.conf
# cred_expire and sched_interval: a requeued job starts again after ~11 s instead of 120 s (both are read
# only when slurmctld starts). CPUs=8 over the real count (config_overrides): a sweep's points and a
# 2-task job run side by side; the tests' jobs are tiny. MinJobAge: a finished job stays visible to
# `scontrol show job` for an hour (default 300 s: a loaded machine's test polled after it was purged).
wanted="ClusterName=lightning-seg
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5
MinJobAge=3600
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_ready() { sinfo -h -n "$host" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

if [ "$(cat "$conf" 2>/dev/null)" = "$wanted" ] && running /run/slurmctld.pid && running /run/slurmd.pid \
    && node_ready; then
    exit 0
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
printf '%s\n' "$wanted" >"$conf"
# a changed config needs fresh daemons (scontrol reconfigure does not apply cred_expire)
for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    if running "$pidfile"; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
done

[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
chown munge:munge /etc/munge/munge.key /run/munge
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged
fi

slurmctld
slurmd
for _ in $(seq 60); do
    node_ready && exit 0
    sleep 0.5
done
cannot "the node did not come up within 30 s; see /var/log/slurm/slurmctld.log and slurmd.log"
