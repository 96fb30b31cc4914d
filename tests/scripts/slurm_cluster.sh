#!/usr/bin/env bash
# A two-node SLURM cluster on localhost for one job (environment.md): run inside
# `unshare --mount --propagation private`, so that the bind-mounted /etc/hosts (n1, n2) stays private.
#   slurm_cluster.sh STATE_DIR SCRIPT [ARGS...]   -> prints "JobState=..." and the job's output
# With PREEMPT_WHEN=FILE:N, the job's batch shell gets SIGUSR1 (what `--signal=B:USR1@T` sends ahead
# of a time limit) once FILE has N lines; the requeued job is then started at once.
set -euo pipefail
R=$1; shift
mkdir -p "$R"/{state,log,spool/n1,spool/n2}
# munged wants every directory above its socket open to all: not a pytest tmp dir (0700)
M=$(mktemp -d /tmp/zoscale-munge.XXXXXX) && chmod 711 "$M" && ln -s "$M" "$R/munge"
cp /etc/hosts "$R/hosts" && echo "127.0.0.1 n1 n2" >> "$R/hosts" && mount --bind "$R/hosts" /etc/hosts
mungekey --create --keyfile="$M/munge.key"
munged --socket="$M/munge.socket" --key-file="$M/munge.key" --log-file="$R/log/munged.log" \
  --pid-file="$M/munged.pid" --seed-file="$M/seed"
host=$(hostname -s)
cat > "$R/slurm.conf" <<CONF
ClusterName=zoscale
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$M/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$R/log/jobcomp.txt
StateSaveLocation=$R/state
SlurmdSpoolDir=$R/spool/%n
SlurmctldPidFile=$R/slurmctld.pid
SlurmdPidFile=$R/slurmd-%n.pid
SlurmctldLogFile=$R/log/slurmctld.log
SlurmdLogFile=$R/log/slurmd-%n.log
ReturnToService=2
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$R/slurm.conf
stop() {
  scancel --quiet --user=root 2>/dev/null || true
  for f in "$R"/slurmd-n1.pid "$R"/slurmd-n2.pid "$R"/slurmctld.pid "$M"/munged.pid; do
    [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.5
  rm -rf "$M"
}
trap stop EXIT
slurmctld -i && slurmd -N n1 && slurmd -N n2
for _ in $(seq 120); do [ "$(sinfo -h -o %T | sort -u)" = "idle" ] && break; sleep 0.5; done
job=$(sbatch --parsable --chdir="$R" -o "$R/job.out" "$@")
state=""
preempted=0
released=0
for _ in $(seq 1200); do  # SLURM enforces time limits only once a minute: poll with our own bound
  info=$(scontrol show job -o "$job")
  state=$(grep -o "JobState=[A-Z_]*" <<<"$info")
  case $state in *COMPLETED*|*FAILED*|*CANCELLED*|*TIMEOUT*|*NODE_FAIL*) break ;; esac
  if [ -n "${PREEMPT_WHEN:-}" ] && [ $preempted = 0 ] && [ -f "${PREEMPT_WHEN%:*}" ] &&
     [ "$(wc -l < "${PREEMPT_WHEN%:*}")" -ge "${PREEMPT_WHEN##*:}" ]; then
    scancel --batch --signal=USR1 "$job" && preempted=1 && echo "preempted job $job"
  fi
  # Requeued: SLURM holds it until a BeginTime minutes away; bring that forward, but not into the
  # second in which the old run's credential was revoked (a start then is killed: "credential revoked").
  if [ $preempted = 1 ] && [ $released = 0 ] && grep -q "JobState=PENDING" <<<"$info"; then
    scontrol update jobid="$job" StartTime=now+3 2>/dev/null && released=1
  fi
  sleep 0.5
done
echo "restarts: $(grep -o "Restarts=[0-9]*" <<<"$info")"
echo "$state"
if [ "$state" != "JobState=COMPLETED" ]; then  # what SLURM said of the job, for the test's failure message
  echo "$info"
  grep -h "JobId=$job\b\|Job $job\b\|job $job\b" "$R"/log/slurmctld.log "$R"/log/slurmd-n*.log | tail -n 20 || true
fi
cat "$R/job.out"
