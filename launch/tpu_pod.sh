#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# BPO on a Cloud TPU VM slice (one or several hosts), or on several slices (multislice: --num-slices N), with
# gcloud: create -> copy -> setup -> run -> logs -> stop / delete. Every worker of every slice runs the same
# command; jax.distributed.initialize() detects the slice by itself, and the slices from the MEGASCALE_* variables
# that `run` sets.
# `watch` (or `run --watch` / `run --restart N`) stays in the foreground: one worker's failure stops them all,
# and with --restart the same command is rerun as the training's exit code says (the program resumes from the
# last checkpoint in run_dir when given the same arguments). A slice is deleted only when --recreate asks.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [options] [-- TRAIN_ARGS...]

Commands:
  create   queued resource NAME (node id NAME; with --num-slices N, N nodes NAME-0 .. NAME-<N-1>, one per
           slice), then wait until it is ACTIVE (--no-wait: don't)
  copy     this repo's tracked files (working-tree contents) to ~/REMOTE_DIR on every worker, plus each
           --model-dir/--data-dir SRC:DEST (SRC a local folder or file, or gs://...; a relative DEST is
           inside REMOTE_DIR, where training runs, so model=DEST in the train args finds it). With
           --stage gs://PREFIX a local SRC is uploaded once to PREFIX/DEST (skipped while its checksum
           is the one uploaded last) and every worker fetches it from there; without, it is uploaded
           from this machine to each worker
  setup    on every worker: .venv with requirements-tpu.txt (installs python3.11 by apt if python3 is
           older), then remove a stale libtpu lock and kill processes still holding the TPU
  run      -- TRAIN_ARGS: first stop stale processes holding the TPU (as setup/stop do), then
           `python -m bpo_jax train TRAIN_ARGS` in the background on every worker (PYTHONUNBUFFERED=1),
           its output appended to ~/bpo_logs/NAME.log on each after a line "[tpu_pod] run started TIME"
           (every run's log is kept); with several workers run_dir must be gs://...
           With --num-slices N, every worker of slice s also gets MEGASCALE_COORDINATOR_ADDRESS (worker 0
           of NAME-0, port 8080), MEGASCALE_NUM_SLICES=N, MEGASCALE_SLICE_ID=s and MEGASCALE_PORT=8080
           With --watch or --restart N, `watch` follows in the foreground. --env KEY passes this shell's
           KEY to the training on every worker, its value never printed
  watch    poll the queued resource and every worker's training (as `status`) every TPU_POLL_SECONDS [30]
           until it ends; when one worker's training ends non-zero, stop the training on all (fail fast).
           With --restart N [-- TRAIN_ARGS], rerun the same TRAIN_ARGS on the same slice, up to N times
           in all, as the training's exit code says: 2 (the user must change something) never; 143
           (stopped by SIGTERM after saving: a preemption notice) at once; any other after --backoff S
           seconds, doubling at each such restart. A lost slice (queued resource SUSPENDED/PREEMPTED/
           FAILED/..., or gone) or a dead host (no answer to --missed-polls N polls in a row) ends the
           watch (exit 3), the slice left as it is; with --recreate (and restarts left) it is deleted and
           created again with the create flags, then copy, setup and the rerun.
           Exit: 0 every worker exited 0; 2 a worker exited 2; 3 the slice is lost; 1 otherwise
  logs     fetch every worker's log to logs/NAME/worker-<i>.log (slice-<s>-worker-<i>.log with
           --num-slices), report how each worker's last run
           ended and the exit codes of the earlier runs in its log; --follow: tail one
  status   queued-resource state, then each worker's training state (non-zero if one failed)
  stop     stop the training on every worker and free the TPU
  delete   delete the queued resource and its TPU

Options (environment default in brackets):
  --name NAME        TPU / queued-resource name [TPU_NAME]
  --zone ZONE        e.g. us-west4-a [TPU_ZONE]
  --project ID       Google Cloud project [TPU_PROJECT; else gcloud's default]
  --type TYPE        accelerator type, e.g. v5litepod-16, v4-32, v6e-16 [TPU_TYPE]
  --runtime VERSION  TPU software version [TPU_RUNTIME; default by type, e.g. v2-alpha-tpuv5-lite]
  --spot | --reserved   capacity kind for create (default: on-demand)
  --no-wait          create returns once the request is queued
  --num-slices N     slices of --type joined by the data-centre network (multislice) [TPU_NUM_SLICES; 1];
                     every command addresses every worker of every slice
  --workers N        hosts in the slice [TPU_WORKERS]; default from --type: v2/v3/v4/v5p-N: N/8
                     (N counts TensorCores), v5litepod/v6e-N: 1 up to 8 chips, else N/4; without a
                     known type, the count of the node's networkEndpoints (gcloud describe)
  --worker W         run: all (default; the only choice with several workers); logs --follow: 0 (of the
                     first slice)
  --watch            run: then `watch` in the foreground (fail fast)
  --restart N        run, watch: rerun up to N times (needs the train args; default 0)
  --recreate         run, watch with --restart: delete and re-create a lost slice (needs --type, and
                     --spot/--reserved as at create); without it, no slice is ever deleted
  --env KEY          run, watch: repeatable; KEY (e.g. HF_TOKEN, WANDB_API_KEY) with its value in this
                     shell's environment, sent to every worker in a file of mode 600 that each start reads
                     and removes: never in a command line, a printed command or a log
  --backoff S        run, watch: seconds before the first restart after an exit code other than 2 and
                     143, doubled at each next one [TPU_RESTART_BACKOFF; 30]
  --missed-polls N   run, watch: a worker counts as dead, and a queued resource that describe does not
                     find as gone, after N polls in a row [TPU_MISSED_POLLS; 5]
  --remote-dir DIR   repo folder on the workers, relative to home [TPU_REMOTE_DIR; bpo_jax]
  --python PY        interpreter for .venv on the workers [TPU_PYTHON; python3 if >= 3.11]
  --model-dir, --data-dir SRC:DEST   copy: repeatable
  --stage gs://PREFIX   copy: where local model/data folders are staged for the workers [TPU_STAGE]
  --follow           logs: tail -F worker W's log instead of fetching all
  --logs-dir DIR     logs: local folder for the fetched logs [TPU_LOGS_DIR; logs/NAME in the repo]
  --dry-run          print each command (prefixed "+ ") and run none, gcloud included
  -h, --help         this text
EOF
}

quit() { local code=$1; shift; echo "tpu_pod.sh: $*" >&2; exit "$code"; }  # CODE MESSAGE
die() { quit 1 "$@"; }

# --env KEY (repeatable; before `--`): KEY and its value in this shell's environment, read before the script sets
# variables of its own (a KEY named like one of them, e.g. NAME, would give the script's value), with xtrace off
# (`bash -x` prints no value).
ENV_KEYS=() ENV_VALUES=()
read_env_flags() {
  { local xtrace=$-; set +x; } 2>/dev/null
  local key
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    case $1 in
      --env) [ $# -ge 2 ] || die "--env needs a value"; key=$2; shift ;;
      --env=*) key=${1#--env=} ;;
      *) shift; continue ;;
    esac
    shift
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env '$key' is not a variable name (letters, digits and _)"
    printenv "$key" >/dev/null || die "--env $key: $key is not set in this shell's environment (export it)"
    ENV_KEYS+=("$key") ENV_VALUES+=("${!key}")
  done
  [[ $xtrace != *x* ]] || set -x
}
read_env_flags "$@"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} PROJECT=${TPU_PROJECT:-} TYPE=${TPU_TYPE:-} RUNTIME=${TPU_RUNTIME:-}
WORKERS=${TPU_WORKERS:-} REMOTE_DIR=${TPU_REMOTE_DIR:-bpo_jax} PY=${TPU_PYTHON:-} SLICES=${TPU_NUM_SLICES:-1}
POLL=${TPU_POLL_SECONDS:-30} LOGS_DIR=${TPU_LOGS_DIR:-} STAGE=${TPU_STAGE:-}
BACKOFF=${TPU_RESTART_BACKOFF:-30} MISSED=${TPU_MISSED_POLLS:-5}
SPOT=0 RESERVED=0 NO_WAIT=0 FOLLOW=0 DRY=0 WORKER=all CMD="" WATCH=0 RESTART=0 RECREATE=0
COPIES=() TRAIN=()

val() { [ $# -ge 2 ] || die "$1 needs a value"; printf '%s' "$2"; }
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; TRAIN=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --no-wait) NO_WAIT=1 ;;
    --follow) FOLLOW=1 ;;
    --dry-run) DRY=1 ;;
    --watch) WATCH=1 ;;
    --restart) RESTART=$(val "$@"); shift ;;
    --recreate) RECREATE=1 ;;
    --backoff) BACKOFF=$(val "$@"); shift ;;
    --missed-polls) MISSED=$(val "$@"); shift ;;
    --name) NAME=$(val "$@"); shift ;;
    --zone) ZONE=$(val "$@"); shift ;;
    --project) PROJECT=$(val "$@"); shift ;;
    --type) TYPE=$(val "$@"); shift ;;
    --runtime) RUNTIME=$(val "$@"); shift ;;
    --workers) WORKERS=$(val "$@"); shift ;;
    --num-slices) SLICES=$(val "$@"); shift ;;
    --worker) WORKER=$(val "$@"); shift ;;
    --remote-dir) REMOTE_DIR=$(val "$@"); shift ;;
    --python) PY=$(val "$@"); shift ;;
    --logs-dir) LOGS_DIR=$(val "$@"); shift ;;
    --model-dir | --data-dir) COPIES+=("$(val "$@")"); shift ;;
    --stage) STAGE=$(val "$@"); shift ;;
    --env) val "$@" >/dev/null; shift ;;  # read by read_env_flags
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$CMD" ] || die "unexpected argument '$1' (train arguments go after --)"; CMD=$1 ;;
  esac
  shift
done

# Shell-quote each argument (bare when it is safe; --flag='value' for flags) for printing or a remote shell.
q() {
  local a out=() re='^[A-Za-z0-9_./:=,@%+-]+$'
  for a in "$@"; do
    if [[ $a =~ $re ]]; then out+=("$a")
    elif [[ $a =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then out+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}'")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}
run() { echo "+ $(q "$@")"; [ "$DRY" = 1 ] || "$@"; }  # one command, as argv
run_sh() { echo "+ $1"; [ "$DRY" = 1 ] || bash -o pipefail -c "$1"; }  # one shell pipeline

LOC=() DESCRIBE=() SSH=() NODES=()
loc() {  # checks the settings every command needs; fills LOC (the gcloud location flags), DESCRIBE and NODES
  [ -n "$NAME" ] || die "--name (or TPU_NAME) is required"
  [ -n "$ZONE" ] || die "--zone (or TPU_ZONE) is required"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lower-case letters, digits and -"
  [[ $REMOTE_DIR =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir '$REMOTE_DIR': letters, digits, _ . / - only"
  LOC=(--zone="$ZONE")
  if [ -n "$PROJECT" ]; then LOC+=(--project="$PROJECT"); fi
  DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)')
  [[ $RESTART =~ ^[0-9]+$ ]] || die "--restart '$RESTART' is not a number"
  [[ $BACKOFF =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--backoff '$BACKOFF' is not a number of seconds"
  [[ $MISSED =~ ^[1-9][0-9]*$ ]] || die "--missed-polls '$MISSED' is not a positive number"
  [[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices '$SLICES' is not a positive number"
  local s
  NODES=("$NAME")  # the TPU node of each slice: the queued resource's node id, or NAME-<s> (--node-prefix)
  if ((SLICES > 1)); then NODES=(); for ((s = 0; s < SLICES; s++)); do NODES+=("$NAME-$s"); done; fi
}
# The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...); empty when it does not exist
# (or gcloud failed: a caller that acts on "gone" asks --missed-polls times).
qr_state() { "${DESCRIBE[@]}" 2>/dev/null || true; }
ssh_argv() {  # NODE WORKER COMMAND: fills SSH, the gcloud command that runs COMMAND on the node's worker(s)
  SSH=(gcloud compute tpus tpu-vm ssh "$1" "${LOC[@]}" --worker="$2" --quiet --strict-host-key-checking=no
    --command="$3")
}
tpu_ssh() {  # WORKER COMMAND: COMMAND in the user's (bash) login shell on the worker(s) of every slice, home as cwd
  local node rc=0
  for node in "${NODES[@]}"; do
    ssh_argv "$node" "$1" "$2"
    run "${SSH[@]}" || rc=$?
  done
  return "$rc"
}
scp_node() {  # NODE SRC DEST WORKER [--recurse]: a remote path is NODE:PATH
  run gcloud compute tpus tpu-vm scp "$2" "$3" "${LOC[@]}" --worker="$4" --quiet --strict-host-key-checking=no \
    "${@:5}"
}
tpu_scp() {  # SRC DEST WORKER [--recurse], on every slice: a remote path is NAME:PATH, sent to each node
  local node
  for node in "${NODES[@]}"; do scp_node "$node" "${1/#$NAME:/$node:}" "${2/#$NAME:/$node:}" "${@:3}"; done
}

workers_for_type() {  # hosts in a slice of accelerator type $1; nothing if unknown
  local n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 0
  case $1 in
    v2-* | v3-* | v4-* | v5p-*) echo $(((n + 7) / 8)) ;;          # N TensorCores, 8 per host
    v5litepod-* | v6e-*) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;  # N chips, 4 per host
  esac
}
runtime_for_type() {
  case $1 in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
  esac
}
resolve_workers() {
  [ -n "$WORKERS" ] || WORKERS=$(workers_for_type "$TYPE")
  if [ -z "$WORKERS" ]; then
    [ "$DRY" = 0 ] || die "--dry-run needs --workers N or a known --type to count the workers"
    WORKERS=$(gcloud compute tpus tpu-vm describe "${NODES[0]}" "${LOC[@]}" \
      --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .) ||
      die "could not count the workers of ${NODES[0]}; pass --workers N"
  fi
  [[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers '$WORKERS' is not a positive number"
}

# The run directory the train args give: the last run_dir=..., else the one in the --config file.
run_dir_of() {
  local a prev="" cfg="" rd=""
  for a in "$@"; do
    case $a in run_dir=*) rd=${a#run_dir=} ;; --config=*) cfg=${a#--config=} ;; esac
    if [ "$prev" = --config ]; then cfg=$a; fi
    prev=$a
  done
  [[ -z $cfg || $cfg = /* ]] || cfg=$ROOT/$cfg
  if [ -z "$rd" ] && [ -f "$cfg" ]; then
    rd=$(sed -n "s/^run_dir:[[:space:]]*[\"']\{0,1\}\([^\"'#[:space:]]*\).*/\1/p" "$cfg" | tail -n 1)
  fi
  echo "$rd"
}

LOG="\$HOME/bpo_logs/"  # on the workers; the file names add NAME
TRAIN_PAT='"^python -m bpo_jax train"'  # pgrep/pkill pattern: the training processes, not the shells
CLEAR_TPU='sudo rm -f /tmp/libtpu_lockfile && { sudo lsof -t -w /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9 || true; }'

cmd_create() {
  [ -n "$TYPE" ] || die "create needs --type (or TPU_TYPE)"
  [ -n "$RUNTIME" ] || RUNTIME=$(runtime_for_type "$TYPE")
  [ -n "$RUNTIME" ] || die "no default runtime for type $TYPE: pass --runtime"
  [ "$SPOT$RESERVED" != 11 ] || die "--spot and --reserved exclude each other"
  local args=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}")
  if ((SLICES > 1)); then  # multislice: SLICES nodes NAME-0 .. NAME-<SLICES-1>, each one slice of TYPE
    args=(gcloud compute tpus queued-resources create "$NAME" --node-count="$SLICES" --node-prefix="$NAME" "${LOC[@]}")
  fi
  args+=(--accelerator-type="$TYPE" --runtime-version="$RUNTIME")
  if [ "$SPOT" = 1 ]; then args+=(--spot); fi
  if [ "$RESERVED" = 1 ]; then args+=(--reserved); fi
  run "${args[@]}"
  [ "$NO_WAIT" = 0 ] || return 0
  local state
  echo "+ $(q "${DESCRIBE[@]}")"
  if [ "$DRY" = 1 ]; then echo "# (repeated every ${POLL}s until the state is ACTIVE)"; return 0; fi
  while :; do
    state=$("${DESCRIBE[@]}")
    case $state in
      ACTIVE) echo "[tpu_pod] $NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED) die "queued resource $NAME is $state (delete it and create again)" ;;
    esac
    echo "[tpu_pod] $NAME is ${state:-not listed yet}; next check in ${POLL}s"
    sleep "$POLL"
  done
}

cmd_copy() {
  local tmp=${TMPDIR:-/tmp} spec src dest i=0
  [[ -z $STAGE || $STAGE =~ ^gs://[A-Za-z0-9_.-]+(/[A-Za-z0-9_./-]*)?$ ]] ||
    die "--stage '$STAGE': a gs://BUCKET/PREFIX the workers can read (letters, digits, _ . / - only)"
  run_sh "git -C $(q "$ROOT") ls-files -z | tar -C $(q "$ROOT") --null -T - -czf $(q "$tmp/bpo_jax-src-$NAME.tar.gz")"
  tpu_scp "$tmp/bpo_jax-src-$NAME.tar.gz" "$NAME:bpo_jax-src.tar.gz" all
  tpu_ssh all "mkdir -p $REMOTE_DIR && tar -xzf bpo_jax-src.tar.gz -C $REMOTE_DIR && rm -f bpo_jax-src.tar.gz"
  for spec in ${COPIES[@]+"${COPIES[@]}"}; do
    src=${spec%:*} dest=${spec##*:}  # the last colon splits: SRC may be gs://...
    [[ $spec == *:* && -n $src && $src != *: ]] || die "'$spec' is not SRC:DEST"
    case $dest in /*) ;; \~/*) dest=${dest#\~/} ;; *) dest=$REMOTE_DIR/$dest ;; esac  # relative to home
    [[ $dest =~ ^[A-Za-z0-9_./-]+$ ]] || die "destination '$dest': letters, digits, _ . / - only"
    if [[ $src == gs://* ]]; then
      tpu_ssh all "mkdir -p $dest && gcloud storage rsync --recursive $(q "$src") $dest"
    elif [ -n "$STAGE" ]; then
      [ "$DRY" = 1 ] || [ -e "$src" ] || die "$src is not a folder, a file or gs://..."
      copy_staged "$src" "$dest"
    elif [ -f "$src" ]; then
      echo "[tpu_pod] uploading $src to every worker from here (--stage gs://PREFIX uploads it once)"
      tpu_ssh all "mkdir -p $(dirname "$dest")"
      tpu_scp "$src" "$NAME:$dest" all
    else
      [ "$DRY" = 1 ] || [ -d "$src" ] || die "$src is not a folder, a file or gs://..."
      echo "[tpu_pod] uploading $src to every worker from here (--stage gs://PREFIX uploads it once)"
      i=$((i + 1))
      run tar -C "$src" -cf "$tmp/bpo_jax-copy-$NAME-$i.tar" .
      tpu_scp "$tmp/bpo_jax-copy-$NAME-$i.tar" "$NAME:bpo_jax-copy-$i.tar" all
      tpu_ssh all "mkdir -p $dest && tar -xf bpo_jax-copy-$i.tar -C $dest && rm -f bpo_jax-copy-$i.tar"
      run rm -f "$tmp/bpo_jax-copy-$NAME-$i.tar"
    fi
  done
}

# A local folder or file SRC to DEST (relative to home) on every worker through the stage: uploaded once to
# STAGE/DEST, with a checksum of its names and contents in STAGE/DEST.bpo-stamp, and the upload skipped while
# that stamp matches (a rerun of copy, a restart with --recreate); then every worker fetches it (rsync: the files
# it already has stay). The stamp is written after the upload, so an interrupted upload is redone.
copy_staged() {
  local src=$1 dest=$2 staged="$STAGE" stamp="" seen=""
  staged="${staged%/}/${dest#/}"
  echo "+ $(q gcloud storage cat "$staged.bpo-stamp")"
  if [ "$DRY" = 1 ]; then
    echo "# (the upload below is skipped when that stamp is the checksum of $src)"
  else
    stamp=$(local_stamp "$src")
    seen=$(gcloud storage cat "$staged.bpo-stamp" 2>/dev/null || true)
  fi
  if [ -n "$stamp" ] && [ "$stamp" = "$seen" ]; then
    echo "[tpu_pod] $src is unchanged since it was staged in $staged: not uploaded again"
  else
    if [ -f "$src" ]; then
      run gcloud storage cp "$src" "$staged"
    else
      run gcloud storage rsync --recursive --delete-unmatched-destination-objects "$src" "$staged"
    fi
    run_sh "echo $(q "${stamp:-CHECKSUM}") | gcloud storage cp - $(q "$staged.bpo-stamp")"
  fi
  if [ -f "$src" ]; then
    tpu_ssh all "mkdir -p $(dirname "$dest") && gcloud storage cp $(q "$staged") $dest"
  else
    tpu_ssh all "mkdir -p $dest && gcloud storage rsync --recursive $(q "$staged") $dest"
  fi
}
local_stamp() {  # SRC: a checksum of a local folder's file names and contents (or a file's contents)
  if [ -d "$1" ]; then
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 cksum) | cksum
  else
    cksum <"$1"
  fi
}

cmd_setup() {
  local py
  py="export PYTHON=$(q "$PY")"
  if [ -z "$PY" ]; then
    py='if python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"; then export PYTHON=python3;'
    py+=' else sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo env DEBIAN_FRONTEND=noninteractive'
    py+=' apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv && export PYTHON=python3.11; fi'
  fi
  tpu_ssh all "cd $REMOTE_DIR && $py && source launch/_setup.sh && bpo_setup requirements-tpu.txt && $CLEAR_TPU"
}

check_train() {  # the train arguments `run` (and a restart) starts on the workers
  [ ${#TRAIN[@]} -gt 0 ] || die "$CMD needs the train arguments after --, e.g. -- --config configs/tldr_gemma2b.yaml"
  resolve_workers
  local hosts=$((WORKERS * SLICES))
  if [ "$WORKER" != all ] && ((hosts > 1)); then
    die "--worker=$WORKER: a run of $hosts workers must run the training on every worker (--worker=all)"
  fi
  local rd; rd=$(run_dir_of "${TRAIN[@]}")
  if ((hosts > 1)) && [[ $rd != gs://* ]]; then
    die "run_dir=${rd:-(unset)} is not shared by the $hosts workers: pass run_dir=gs://BUCKET/PATH"
  fi
}
check_restart() {  # a restart reruns the train arguments; --recreate re-creates the slice as `create` would
  [ "$RECREATE" = 0 ] || ((RESTART > 0)) || die "--recreate acts on restarts: pass --restart N too"
  ((RESTART > 0)) || return 0
  [ "$RECREATE" = 0 ] || [ -n "$TYPE" ] ||
    die "--recreate needs --type (with --spot/--reserved/--runtime as for create) to re-create $NAME"
  check_train
}

# [NOTE]: refuses when training already runs there; otherwise clears the TPU of stale holders (the same
# $CLEAR_TPU as setup/stop: a crashed run's process keeps /dev/accel* and the next one cannot start) and starts
# the training detached, unbuffered so the log shows each line as it is printed. Each run appends to NAME.log
# after a header "[tpu_pod] run started TIME (NOTE)", so the logs of earlier runs stay; the run's exit code goes
# to NAME.rc and, as "[bpo_jax] exit code RC", to the log. With several slices each node's workers get the
# MEGASCALE_* variables of their slice (megascale_env), looked up again at each start (a re-created slice has
# new addresses). With --env, each start sends the values again (send_env) and first reads them there.
start_training() {
  local log="$LOG$NAME" header s=0 node rc=0 env=""
  header="echo $(q "[tpu_pod] run started") \$(date -u +%FT%TZ)${1:+ $(q "($1)")}"
  COORDINATOR=""
  if ((SLICES > 1)); then find_coordinator; fi
  if [ ${#ENV_KEYS[@]} -gt 0 ]; then send_env; env=". ./$REMOTE_ENV && rm -f $REMOTE_ENV && "; fi
  for node in "${NODES[@]}"; do
    ssh_argv "$node" "$WORKER" "$env""cd $REMOTE_DIR && if pgrep -f $TRAIN_PAT >/dev/null; then echo \"\$(hostname): training is already running (stop it first)\" >&2; exit 1; fi && $CLEAR_TPU && source .venv/bin/activate && $(megascale_env "$s")export PYTHONUNBUFFERED=1 && mkdir -p ${LOG%/} && rm -f $log.rc && $header >> $log.log && { (trap \"\" HUP; nohup python -m bpo_jax train $(q "${TRAIN[@]}"); rc=\$?; echo \"[bpo_jax] exit code \$rc\"; echo \$rc > $log.rc) >> $log.log 2>&1 < /dev/null & } && echo \"\$(hostname): started, log in $log.log\""
    run "${SSH[@]}" || rc=$?
    s=$((s + 1))
  done
  return "$rc"
}

# --env: the values go to ~/REMOTE_ENV on the workers of every slice in a file of mode 600, made here (removed
# here once sent, or at exit) and read and removed there by the start command, so they appear on no command line.
REMOTE_ENV=.bpo_jax-env LOCAL_ENV=""
trap 'rm -f "$LOCAL_ENV"' EXIT
send_env() {
  local file="${TMPDIR:-/tmp}/bpo_jax-env-XXXXXX"
  echo "[tpu_pod] --env ${ENV_KEYS[*]}: the values in a file of mode 600, read and removed by the start command"
  if [ "$DRY" = 0 ]; then
    LOCAL_ENV=$(umask 077 && mktemp "$file") || die "could not make a temporary file like $file"
    file=$LOCAL_ENV
    write_env "$file"
  fi
  tpu_scp "$file" "$NAME:$REMOTE_ENV" "$WORKER"
  if [ "$DRY" = 0 ]; then rm -f "$file"; fi
}
write_env() {  # FILE: an `export KEY=VALUE` line (bash-quoted) per --env, xtrace off
  { local xtrace=$-; set +x; } 2>/dev/null
  local i
  for i in "${!ENV_KEYS[@]}"; do printf 'export %s=%q\n' "${ENV_KEYS[i]}" "${ENV_VALUES[i]}"; done >"$1"
  [[ $xtrace != *x* ]] || set -x
}

# Multislice: JAX's gcetpu detection reads MEGASCALE_COORDINATOR_ADDRESS (its host, with JAX's own port),
# MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID from the environment before the VM's metadata, and numbers the
# processes slice by slice; libtpu's DCN transport reads the same variables and MEGASCALE_PORT. The coordinator
# is worker 0 of slice 0, JAX's process 0.
MEGASCALE_PORT=8080 COORDINATOR=""
find_coordinator() {  # COORDINATOR: the internal address of worker 0 of the first slice (a placeholder if dry)
  local argv=(gcloud compute tpus tpu-vm describe "${NODES[0]}" "${LOC[@]}"
    --format='value(networkEndpoints[0].ipAddress)')
  echo "+ $(q "${argv[@]}")"
  if [ "$DRY" = 1 ]; then COORDINATOR=COORDINATOR_IP; return 0; fi
  COORDINATOR=$("${argv[@]}") && [ -n "$COORDINATOR" ] || die "could not find the address of worker 0 of ${NODES[0]}"
}
megascale_env() {  # SLICE: the exports (then " && ") for the workers of slice SLICE; nothing for one slice
  [ -n "$COORDINATOR" ] || return 0
  printf 'export MEGASCALE_COORDINATOR_ADDRESS=%s:%s MEGASCALE_NUM_SLICES=%s MEGASCALE_SLICE_ID=%s MEGASCALE_PORT=%s && ' \
    "$COORDINATOR" "$MEGASCALE_PORT" "$SLICES" "$1" "$MEGASCALE_PORT"
}

cmd_run() {
  check_train
  check_restart
  start_training
  if [ "$WATCH" = 1 ] || ((RESTART > 0)); then watch_loop; fi
}

cmd_watch() {
  resolve_workers
  check_restart
  watch_loop
}

# status, logs, watch: following the training (watch_loop restarts it with start_training and re-creates a
# lost slice with cmd_delete, cmd_create, cmd_copy and cmd_setup)
# shellcheck source=_tpu_pod_watch.sh
source "$ROOT/launch/_tpu_pod_watch.sh"

cmd_stop() {
  tpu_ssh all "pkill -TERM -f $TRAIN_PAT; for i in \$(seq 180); do pgrep -f $TRAIN_PAT >/dev/null || break; sleep 1; done; pkill -KILL -f $TRAIN_PAT; $CLEAR_TPU; echo \"\$(hostname): stopped\""
}

cmd_delete() {
  run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
}

case $CMD in
  create | copy | setup | run | watch | logs | status | stop | delete) loc; "cmd_$CMD" ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$CMD' (see --help)" ;;
esac
