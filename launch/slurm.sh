#!/usr/bin/env bash
# BPO on several nodes under Slurm: writes an sbatch script (one JAX process per node, seeing all of the node's
# GPUs) to <log dir>/<job-name>.sbatch and submits it. The repo (and its .venv) must be on a filesystem all nodes
# share, and so must run_dir. The time limit and preemption reach the tasks, which save and exit 143; the job then
# requeues itself and resumes from the last checkpoint in run_dir (the program does that when rerun with the same
# arguments). Tested under a real Slurm 22.05 (tests/runtime/test_slurm.py).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [options] -- TRAIN_ARGS...
  e.g. launch/slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00 -- \
         --config configs/tldr_gemma2b.yaml model=... reward_model=... data_dir=... run_dir=/shared/runs/x

The job sets up .venv once (bpo_setup requirements-gpu.txt, or requirements.txt on CPU nodes; a no-op when it is
already installed), then srun starts `python -m bpo_jax train TRAIN_ARGS` on every node with
BPO_COORDINATOR_ADDRESS (first node), BPO_NUM_PROCESSES (nodes) and BPO_PROCESS_ID (task rank); each process uses
every GPU of its node. One log per node: <log dir>/<job-name>-<job id>-<rank>.log (set-up:
<log dir>/<job-name>-<job id>.log; both appended to when the job is requeued). The training runs with
PYTHONUNBUFFERED=1 (line-buffered logs).

Exit codes (python -m bpo_jax's contract; the job's code is the highest of its tasks'):
  0    done.
  2    the user must change something (config, data, a checkpoint that does not fit): not requeued.
  143  stopped by SIGTERM after saving (the time limit's --signal, preemption, scancel --signal=TERM):
       requeued at once; the rerun resumes from the checkpoint.
  else a transient failure (a host, the network, storage): requeued after a back-off (--retry-backoff seconds,
       doubling per retry) up to --max-retries times, then the job fails with that code.

Options:
  --nodes N            nodes, one process each (default 1)
  --gpus-per-node N    GPUs per node (default 8; 0: CPU nodes, no GPU request, the CPU build of JAX)
  --partition P        --account A        --time T (e.g. 12:00:00)    (Slurm's defaults if not given)
  --job-name NAME      (default bpo_jax)
  --port PORT          coordinator port on the first node (default: 10000 + job id % 50000, computed in
                       the job, so two jobs sharing a first node don't collide)
  --signal-seconds S   SIGTERM to every task S seconds before the time limit (default 120; Slurm checks time
                       limits every 30 s, so the signal may come up to 30 s later than asked)
  --max-retries N      requeues after transient failures (default 3; 0: none)
  --retry-backoff S    seconds the job waits before its first retry, doubled for each next one (default 60)
  --cpus-per-task N    CPUs for each task (sbatch and srun; default: Slurm's)
  --no-exclusive       share the nodes (default: #SBATCH --exclusive)
  --no-setup           use .venv as it is (no pip in the job; e.g. compute nodes without internet)
  --log-dir DIR        where the sbatch script and the logs go (default: <repo>/logs)
  --sbatch ARG         extra sbatch option, e.g. --sbatch=--qos=high (repeatable)
  --dry-run            print the sbatch script and the commands; write and submit nothing
  -h, --help           this text
EOF
}

die() { echo "slurm.sh: $*" >&2; exit 1; }
val() { [ $# -ge 2 ] || die "$1 needs a value"; printf '%s' "$2"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES=1 GPUS=8 PARTITION="" ACCOUNT="" TIME="" JOB=bpo_jax PORT="" DRY=0 SIGNAL_S=120 CPUS="" EXCLUSIVE=1
RETRIES=3 BACKOFF=60 SETUP=1 LOGS="$ROOT/logs"
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
    --max-retries) RETRIES=$(val "$@"); shift ;;
    --retry-backoff) BACKOFF=$(val "$@"); shift ;;
    --cpus-per-task) CPUS=$(val "$@"); shift ;;
    --no-exclusive) EXCLUSIVE=0 ;;
    --no-setup) SETUP=0 ;;
    --log-dir) LOGS=$(val "$@"); shift ;;
    --sbatch) EXTRA+=("$(val "$@")"); shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    *) die "unknown argument '$1' (train arguments go after --; see --help)" ;;
  esac
  shift
done
[ ${#TRAIN[@]} -gt 0 ] || die "the train arguments go after --, e.g. -- --config configs/tldr_gemma2b.yaml"
for n in "$NODES" "$SIGNAL_S" "$BACKOFF" ${PORT:+"$PORT"} ${CPUS:+"$CPUS"}; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"
done
for n in "$GPUS" "$RETRIES"; do
  [[ $n =~ ^[0-9]+$ ]] || die "'$n' is not a number (0 or more)"
done
[[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name '$JOB': letters, digits, _ . - only"
LOGS=$(realpath -m "$LOGS")  # absolute: the job runs elsewhere

# Shell-quote each argument (bare when it is safe).
q() {
  local a out=() re='^[A-Za-z0-9_./:=,@%+-]+$'
  for a in "$@"; do
    if [[ $a =~ $re ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}

header() {
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=$JOB"
  echo "#SBATCH --nodes=$NODES"
  echo '#SBATCH --ntasks-per-node=1'
  if [ "$GPUS" != 0 ]; then echo "#SBATCH --gpus-per-node=$GPUS"; fi
  if [ -n "$PARTITION" ]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [ -n "$ACCOUNT" ]; then echo "#SBATCH --account=$ACCOUNT"; fi
  if [ -n "$TIME" ]; then echo "#SBATCH --time=$TIME"; fi
  if [ -n "$CPUS" ]; then echo "#SBATCH --cpus-per-task=$CPUS"; fi
  if [ "$EXCLUSIVE" = 1 ]; then echo '#SBATCH --exclusive'; fi
  # SIGTERM to the tasks themselves (no B:) ahead of the time limit: a real Slurm answers a TERM that the batch
  # shell passes on to srun by SIGKILLing the tasks, which then save nothing.
  echo "#SBATCH --signal=TERM@$SIGNAL_S"
  echo '#SBATCH --requeue'
  echo '#SBATCH --open-mode=append'
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do echo "#SBATCH $a"; done
  echo "#SBATCH --output=$LOGS/%x-%j.log"
}

script() {
  header
  echo 'set -euo pipefail'
  echo "cd $(q "$ROOT")"
  echo "LOGS=$(q "$LOGS") MAX_RETRIES=$RETRIES BACKOFF=$BACKOFF"
  if [ -n "$PORT" ]; then
    echo "BPO_PORT=$PORT"
  else
    echo '# From the job id: two jobs whose first node is the same do not pick the same port.'
    # shellcheck disable=SC2016  # expanded in the job, not here
    echo 'BPO_PORT=$((10000 + SLURM_JOB_ID % 50000))'
  fi
  cat <<'EOF'
export PYTHONUNBUFFERED=1
# This shell may get SIGTERM too (scancel, the time limit itself): it keeps waiting for the tasks, which get
# their own SIGTERM from Slurm, save and exit; their exit code then decides below.
trap 'echo "[bpo_jax] SIGTERM to the batch script: waiting for the tasks to save" >&2' TERM
# shellcheck disable=SC1091
source launch/_setup.sh
EOF
  if [ "$SETUP" = 0 ]; then
    echo '. .venv/bin/activate  # --no-setup: .venv as it is'
  elif [ "$GPUS" = 0 ]; then
    echo 'bpo_setup  # once, on the first node, before any task starts (.venv is on the shared filesystem)'
  else
    echo 'bpo_setup requirements-gpu.txt  # once, on the first node, before any task starts (.venv is shared)'
  fi
  cat <<'EOF'
# Expanded at run time, in the job: process 0 (the first node) coordinates.
BPO_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$BPO_PORT"
export BPO_COORDINATOR_ADDRESS
export BPO_NUM_PROCESSES="$SLURM_NNODES"
# One task per node; BPO_PROCESS_ID is set in each task (single quotes: expanded there, not here). srun does
# not end the other tasks when one fails (no kill-on-bad-exit): the hosts agree on errors and end together (a
# dead host ends the others through JAX's heartbeat), and srun then returns the highest task code; with it,
# srun would SIGTERM the slower tasks of an agreed config error and return 143, which would requeue the job.
# In the background, so that the trap above runs as soon as SIGTERM comes (bash runs traps only between
# commands).
# shellcheck disable=SC2016
srun --ntasks-per-node=1 --output="$LOGS/%x-%j-%t.log" \
EOF
  if [ -n "$CPUS" ]; then echo "    --cpus-per-task=$CPUS \\"; fi  # srun does not inherit it from sbatch
  if [ "$GPUS" != 0 ]; then echo "    --gpus-per-node=$GPUS \\"; fi  # every GPU of the node to its one task
  cat <<'EOF'
    bash -c 'export BPO_PROCESS_ID="$SLURM_PROCID"; exec "$@"' bpo_task \
EOF
  echo "    python -m bpo_jax train $(q "${TRAIN[@]}") &"
  cat <<'EOF'
srun_pid=$! rc=0
# `wait` returns early when the trap runs; wait again until srun has ended, for its code.
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do rc=0; wait "$srun_pid" || rc=$?; done
retries="$LOGS/$SLURM_JOB_NAME-$SLURM_JOB_ID.retries"  # transient failures so far (requeues keep the job id)
case $rc in
  0) rm -f "$retries"; exit 0 ;;
  2) echo "[bpo_jax] the training stopped with a configuration error (exit 2): not requeued" >&2; exit 2 ;;
  143) echo "[bpo_jax] the tasks saved after SIGTERM: requeueing job $SLURM_JOB_ID" >&2 ;;
  *)
    n=$(cat "$retries" 2>/dev/null || echo 0)
    if [ "$n" -ge "$MAX_RETRIES" ]; then
      echo "[bpo_jax] exit $rc after $n retries: giving up (--max-retries $MAX_RETRIES)" >&2; exit "$rc"
    fi
    echo $((n + 1)) >"$retries"
    echo "[bpo_jax] exit $rc, a transient failure: retry $((n + 1)) of $MAX_RETRIES in $((BACKOFF << n)) s" >&2
    sleep $((BACKOFF << n)) ;;
esac
scontrol requeue "$SLURM_JOB_ID" || { echo "[bpo_jax] scontrol requeue $SLURM_JOB_ID failed" >&2; exit "$rc"; }
EOF
}

file="$LOGS/$JOB.sbatch"
body=$(script)
if [ "$DRY" = 1 ]; then
  echo "----- $file -----"
  printf '%s\n' "$body"
  echo "----- end of $file -----"
  echo "+ $(q mkdir -p "$LOGS")"
  echo "+ $(q sbatch "$file")"
  exit 0
fi
mkdir -p "$LOGS"
printf '%s\n' "$body" >"$file"
echo "+ $(q sbatch "$file")"
sbatch "$file"
