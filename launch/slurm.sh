#!/usr/bin/env bash
# BPO on several GPU nodes under SLURM: writes an sbatch script (one JAX process per node, seeing all of the
# node's GPUs) to logs/<job-name>.sbatch and submits it. The repo (and its .venv) must be on a filesystem
# all nodes share, and so must run_dir.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [options] -- TRAIN_ARGS...
  e.g. launch/slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00 -- \
         --config configs/tldr_gemma2b.yaml model=... reward_model=... data_dir=... run_dir=/shared/runs/x

The job sets up .venv once (bpo_setup requirements-gpu.txt; a no-op when it is already installed), then
srun starts `python -m bpo_jax train TRAIN_ARGS` on every node with BPO_COORDINATOR_ADDRESS (first node),
BPO_NUM_PROCESSES (nodes) and BPO_PROCESS_ID (task rank). One log per node: logs/<job-name>-<job id>-<rank>.log
(set-up: logs/<job-name>-<job id>.log). One failing node ends the job (srun --kill-on-bad-exit=1).

Options:
  --nodes N            nodes, one process each (default 1)
  --gpus-per-node N    GPUs per node (default 8)
  --partition P        --account A        --time T (e.g. 12:00:00)    (SLURM's defaults if not given)
  --job-name NAME      (default bpo_jax)
  --port PORT          coordinator port on the first node (default 12355)
  --sbatch ARG         extra sbatch option, e.g. --sbatch=--qos=high (repeatable)
  --dry-run            print the sbatch script and the commands; write and submit nothing
  -h, --help           this text
EOF
}

die() { echo "slurm.sh: $*" >&2; exit 1; }
val() { [ $# -ge 2 ] || die "$1 needs a value"; printf '%s' "$2"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES=1 GPUS=8 PARTITION="" ACCOUNT="" TIME="" JOB=bpo_jax PORT=12355 DRY=0
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
    --sbatch) EXTRA+=("$(val "$@")"); shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    *) die "unknown argument '$1' (train arguments go after --; see --help)" ;;
  esac
  shift
done
[ ${#TRAIN[@]} -gt 0 ] || die "the train arguments go after --, e.g. -- --config configs/tldr_gemma2b.yaml"
for n in "$NODES" "$GPUS" "$PORT"; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"; done
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
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do echo "#SBATCH $a"; done
  echo "#SBATCH --output=$ROOT/logs/%x-%j.log"
  echo 'set -euo pipefail'
  echo "cd $(q "$ROOT")"
  echo "BPO_PORT=$PORT"
  cat <<'EOF'
# Set-up once, here on the first node, before any task starts (.venv is on the shared filesystem).
# shellcheck disable=SC1091
source launch/_setup.sh
bpo_setup requirements-gpu.txt
# Expanded at run time, in the job: process 0 (the first node) coordinates.
BPO_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$BPO_PORT"
export BPO_COORDINATOR_ADDRESS
export BPO_NUM_PROCESSES="$SLURM_NNODES"
# One task per node; BPO_PROCESS_ID is set in each task (single quotes: expanded there, not here).
# shellcheck disable=SC2016
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output=logs/%x-%j-%t.log \
  bash -c 'export BPO_PROCESS_ID="$SLURM_PROCID"; exec "$@"' bpo_task \
EOF
  echo "  python -m bpo_jax train $(q "${TRAIN[@]}")"
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
