#!/usr/bin/env bash
# BPO on several GPU nodes under SLURM: writes an sbatch script (one JAX process per node, seeing all of the
# node's GPUs) to logs/<job-name>.sbatch and submits it. The repo (and its .venv) must be on a filesystem
# all nodes share, and so must run_dir. Preemption and the time limit requeue the job, which resumes from the
# last checkpoint in run_dir (the program does that when rerun with the same arguments).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [options] -- TRAIN_ARGS...
  e.g. launch/slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00 -- \
         --config configs/tldr_gemma2b.yaml model=... reward_model=... data_dir=... run_dir=/shared/runs/x

The job sets up .venv once (bpo_setup requirements-gpu.txt; a no-op when it is already installed), then
srun starts `python -m bpo_jax train TRAIN_ARGS` on every node with BPO_COORDINATOR_ADDRESS (first node),
BPO_NUM_PROCESSES (nodes) and BPO_PROCESS_ID (task rank). One log per node: logs/<job-name>-<job id>-<rank>.log
(set-up: logs/<job-name>-<job id>.log; both appended to when the job is requeued). One failing node ends
the job (srun --kill-on-bad-exit=1). The training runs with PYTHONUNBUFFERED=1 (line-buffered logs).

Preemption and the time limit: SLURM signals the batch script S seconds ahead (--signal=B:TERM@S); it
forwards SIGTERM to srun, so every task saves a checkpoint and exits 143, then `scontrol requeue`s the job
(--requeue), which reruns the same command and resumes from run_dir. A job that failed (any other exit code,
e.g. 2 for a config error) is not requeued.

Options:
  --nodes N            nodes, one process each (default 1)
  --gpus-per-node N    GPUs per node (default 8)
  --partition P        --account A        --time T (e.g. 12:00:00)    (SLURM's defaults if not given)
  --job-name NAME      (default bpo_jax)
  --port PORT          coordinator port on the first node (default: 10000 + job id % 50000, computed in
                       the job, so two jobs sharing a first node don't collide)
  --signal-seconds S   SIGTERM to the batch script S seconds before the time limit (default 120)
  --cpus-per-task N    CPUs for each task (sbatch and srun; default: SLURM's)
  --no-exclusive       share the nodes (default: #SBATCH --exclusive)
  --sbatch ARG         extra sbatch option, e.g. --sbatch=--qos=high (repeatable)
  --dry-run            print the sbatch script and the commands; write and submit nothing
  -h, --help           this text
EOF
}

die() { echo "slurm.sh: $*" >&2; exit 1; }
val() { [ $# -ge 2 ] || die "$1 needs a value"; printf '%s' "$2"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES=1 GPUS=8 PARTITION="" ACCOUNT="" TIME="" JOB=bpo_jax PORT="" DRY=0 SIGNAL_S=120 CPUS="" EXCLUSIVE=1
EXTRA=() TRAIN=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; TRAIN=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --nodes) NODES=$(val "$@"); shift ;;
    --gpus-per-node) GPUS=$(val "$@"); shift ;;
    --partition) PARTITION=$(val "$@"); shift ;;
    --account) ACCOUNT=$(val "$@"); shift ;;
    --time) TIME=$(val "$@"); shift ;;
    --job-name) JOB=$(val "$@"); shift ;;
    --port) PORT=$(val "$@"); shift ;;
    --signal-seconds) SIGNAL_S=$(val "$@"); shift ;;
    --cpus-per-task) CPUS=$(val "$@"); shift ;;
    --no-exclusive) EXCLUSIVE=0 ;;
    --sbatch) EXTRA+=("$(val "$@")"); shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    *) die "unknown argument '$1' (train arguments go after --; see --help)" ;;
  esac
  shift
done
[ ${#TRAIN[@]} -gt 0 ] || die "the train arguments go after --, e.g. -- --config configs/tldr_gemma2b.yaml"
for n in "$NODES" "$GPUS" "$SIGNAL_S" ${PORT:+"$PORT"} ${CPUS:+"$CPUS"}; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"
done
[[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name '$JOB': letters, digits, _ . - only"

# Shell-quote each argument (bare when it is safe).
q() {
  local a out=() re='^[A-Za-z0-9_./:=,@%+-]+$'
  for a in "$@"; do
    if [[ $a =~ $re ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}

script() {
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=$JOB"
  echo "#SBATCH --nodes=$NODES"
  echo '#SBATCH --ntasks-per-node=1'
  echo "#SBATCH --gpus-per-node=$GPUS"
  if [ -n "$PARTITION" ]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [ -n "$ACCOUNT" ]; then echo "#SBATCH --account=$ACCOUNT"; fi
  if [ -n "$TIME" ]; then echo "#SBATCH --time=$TIME"; fi
  if [ -n "$CPUS" ]; then echo "#SBATCH --cpus-per-task=$CPUS"; fi
  if [ "$EXCLUSIVE" = 1 ]; then echo '#SBATCH --exclusive'; fi
  # SIGTERM to the batch shell only (B:) ahead of the time limit: the trap below passes it on to the tasks.
  echo "#SBATCH --signal=B:TERM@$SIGNAL_S"
  echo '#SBATCH --requeue'
  echo '#SBATCH --open-mode=append'
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do echo "#SBATCH $a"; done
  echo "#SBATCH --output=$ROOT/logs/%x-%j.log"
  echo 'set -euo pipefail'
  echo "cd $(q "$ROOT")"
  if [ -n "$PORT" ]; then
    echo "BPO_PORT=$PORT"
  else
    echo '# From the job id: two jobs whose first node is the same do not pick the same port.'
    # shellcheck disable=SC2016  # expanded in the job, not here
    echo 'BPO_PORT=$((10000 + SLURM_JOB_ID % 50000))'
  fi
  cat <<'EOF'
export PYTHONUNBUFFERED=1
# SIGTERM (the --signal warning before the time limit, preemption, scancel --signal=TERM) comes to this shell:
# pass it to srun, which passes it to every task; each saves a checkpoint and exits 143. The job is requeued
# below and resumes from it. Trapped from the start: a signal during the set-up skips the training.
signalled=0 srun_pid=""
# shellcheck disable=SC2329  # called by the trap
forward_term() {
  signalled=1
  echo "[bpo_jax] SIGTERM: passing it to the tasks, then requeueing job $SLURM_JOB_ID" >&2
  if [ -n "$srun_pid" ]; then kill -TERM "$srun_pid" 2>/dev/null || true; fi
}
trap forward_term TERM
# Set-up once, here on the first node, before any task starts (.venv is on the shared filesystem).
# shellcheck disable=SC1091
source launch/_setup.sh
bpo_setup requirements-gpu.txt
# Expanded at run time, in the job: process 0 (the first node) coordinates.
BPO_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$BPO_PORT"
export BPO_COORDINATOR_ADDRESS
export BPO_NUM_PROCESSES="$SLURM_NNODES"
rc=0
if [ "$signalled" = 0 ]; then
  # One task per node; BPO_PROCESS_ID is set in each task (single quotes: expanded there, not here). In the
  # background, so that the trap runs as soon as SIGTERM comes (bash runs traps only between commands).
  # shellcheck disable=SC2016
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output=logs/%x-%j-%t.log \
EOF
  if [ -n "$CPUS" ]; then echo "    --cpus-per-task=$CPUS \\"; fi  # srun does not inherit it from sbatch
  cat <<'EOF'
    bash -c 'export BPO_PROCESS_ID="$SLURM_PROCID"; exec "$@"' bpo_task \
EOF
  echo "    python -m bpo_jax train $(q "${TRAIN[@]}") &"
  cat <<'EOF'
  srun_pid=$!
  # `wait` returns early when the trap runs; wait again until srun has ended (the tasks saved), for its code.
  wait "$srun_pid" || rc=$?
  while kill -0 "$srun_pid" 2>/dev/null; do rc=0; wait "$srun_pid" || rc=$?; done
else
  rc=143  # SIGTERM during the set-up: nothing started; requeue
fi
if [ "$signalled" = 1 ] && [ "$rc" != 0 ]; then
  # Stopped by the signal (143 after a save): queue the same job again; it resumes from the checkpoint.
  scontrol requeue "$SLURM_JOB_ID" || echo "[bpo_jax] scontrol requeue $SLURM_JOB_ID failed" >&2
fi
exit "$rc"
EOF
}

file="$ROOT/logs/$JOB.sbatch"
body=$(script)
if [ "$DRY" = 1 ]; then
  echo "----- $file -----"
  printf '%s\n' "$body"
  echo "----- end of $file -----"
  echo "+ $(q mkdir -p "$ROOT/logs")"
  echo "+ $(q sbatch "$file")"
  exit 0
fi
mkdir -p "$ROOT/logs"
printf '%s\n' "$body" >"$file"
echo "+ $(q sbatch "$file")"
sbatch "$file"
