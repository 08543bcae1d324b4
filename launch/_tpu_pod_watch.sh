# Sourced by launch/tpu_pod.sh: following a started training on the workers. `status` (the queued resource's
# state, then each worker's training state), `logs` (fetch every worker's log, and how each run in it ended) and
# `watch` (poll both until the training ends; fail fast; restart as the exit code says; --recreate a lost slice).
# The functions read the launcher's settings (NAME, WORKERS, SLICES, POLL, ...) and call its commands.
# shellcheck shell=bash disable=SC2154

# The training's exit codes are a contract: 0 done; 2 the user must change something (config, data, a checkpoint
# that does not fit), never restarted; 143 stopped by SIGTERM after saving (a preemption notice), rerun at once;
# anything else a transient failure, rerun after BACKOFF seconds, doubled at each one. Fail fast: once one worker
# has ended, the others would wait in a collective until a timeout, so stop them all. Reruns use the same slice
# (the program resumes from the last checkpoint). A lost slice (preempted, gone, or a dead host) is deleted and
# created again only with --recreate: deleting it gives up its Spot or reserved capacity.
watch_loop() {
  local restarts=0 transient=0 delay
  while :; do
    wait_for_end
    case $ENDED in
      dry)
        if ((RESTART > 0)); then
          echo "# (then up to $RESTART reruns: after exit code 143 at once, after 2 never, after another in" \
            "${BACKOFF}s, doubling; a lost slice: $([ "$RECREATE" = 1 ] && echo "delete, create, copy, setup" ||
              echo "exit 3"))"
        fi
        return 0 ;;
      ok) echo "[tpu_pod] the training finished on every worker (exit code 0)"; return 0 ;;
      lost) ;;  # the workers are gone: nothing to stop
      *) echo "[tpu_pod] $WHY: stopping the training on every worker"; cmd_stop || true ;;
    esac
    if [ "$ENDED" = config ]; then
      quit 2 "$WHY: the user must change something (config, data, checkpoint): not restarted (see 'logs')"
    fi
    if [[ $ENDED == lost || $ENDED == dead ]] && [ "$RECREATE" = 0 ]; then
      quit 3 "$WHY: $NAME is left as it is (no --recreate). To go on: delete, create, copy, setup and the same" \
        "run, or let watch do it: --restart N --recreate"
    fi
    ((restarts < RESTART)) || die "$WHY: not restarted (restarts done: $restarts of $RESTART; 'logs' fetches the logs)"
    restarts=$((restarts + 1))
    case $ENDED in
      sigterm) echo "[tpu_pod] $WHY: restart $restarts of $RESTART on the same slice, now" ;;
      failed)
        delay=$(awk -v b="$BACKOFF" -v n="$transient" 'BEGIN { printf "%.10g", b * 2 ^ n }')
        transient=$((transient + 1))
        echo "[tpu_pod] $WHY: restart $restarts of $RESTART on the same slice in ${delay}s"
        sleep "$delay" ;;
      *)  # lost or dead, with --recreate: the VMs are new or gone, so copy and setup again
        echo "[tpu_pod] $WHY: restart $restarts of $RESTART: deleting and re-creating $NAME (--recreate)"
        cmd_delete || true  # fails when it is gone already
        # shellcheck disable=SC2034  # read by cmd_create
        NO_WAIT=0
        cmd_create
        cmd_copy
        cmd_setup ;;
    esac
    # A start that fails (a host going down as we start) is seen by the next poll, which restarts again.
    start_training "restart $restarts of $RESTART" || echo "[tpu_pod] the training did not start on every worker" >&2
  done
}

# Polls the queued resource's state and every worker's training state (status's command) every POLL seconds
# until the training has ended on a worker; sets WHY and ENDED: ok (every worker exited 0), config (one exited 2),
# sigterm (143 only), failed (another code), lost (the queued resource is not ACTIVE), dead, or dry. A worker that
# reports neither running nor an exit code (ssh failed: host down; or the process vanished without one) counts as
# dead on the MISSED-th poll in a row, so dropped ssh connections do not restart; likewise a queued resource
# that describe does not find counts as gone.
ENDED="" WHY=""
wait_for_end() {
  local state out line rc running exited lost misses=0 gone=0 failed last="" now node hosts=$((WORKERS * SLICES))
  echo "+ $(q "${DESCRIBE[@]}")"
  for node in "${NODES[@]}"; do ssh_argv "$node" all "$(state_cmd)"; echo "+ $(q "${SSH[@]}")"; done
  if [ "$DRY" = 1 ]; then echo "# (all repeated every ${POLL}s until the training ends)"; ENDED=dry; return 0; fi
  while :; do
    state=$(qr_state)
    if [ -z "$state" ]; then gone=$((gone + 1)); else gone=0; fi
    case $state in
      ACTIVE) ;;
      SUSPENDING | SUSPENDED | PREEMPTED | FAILED | DELETING | "")  # Spot/preemptible reclaimed, or deleted
        if [ -n "$state" ] || ((gone >= MISSED)); then
          ENDED=lost WHY="queued resource $NAME is ${state:-gone} (preempted?)"; return 0
        fi
        sleep "$POLL"; continue ;;
      *) echo "[tpu_pod] $(date +%H:%M:%S) queued resource $NAME is $state"; sleep "$POLL"; continue ;;
    esac
    out=$(for node in "${NODES[@]}"; do ssh_argv "$node" all "$(state_cmd)"; "${SSH[@]}" 2>/dev/null || true; done)
    running=0 exited=0 failed=""
    while IFS= read -r line; do
      case $line in
        *"| "*) ;;  # a log line
        *": running") running=$((running + 1)) ;;
        *": exited with code "*) exited=$((exited + 1)) rc=${line##* }; [ "$rc" = 0 ] || failed+=" $rc" ;;
      esac
    done <<<"$out"
    if [ -n "$failed" ]; then
      ENDED=failed WHY="a worker's training exited with code${failed}"
      if [[ " $failed " == *" 2 "* ]]; then ENDED=config
      elif [ -z "${failed// 143/}" ]; then ENDED=sigterm WHY+=" (stopped by SIGTERM after saving)"; fi
      return 0
    fi
    lost=$((hosts - running - exited))
    if ((lost <= 0 && running == 0)); then ENDED=ok; return 0; fi
    if ((lost > 0)); then misses=$((misses + 1)); else misses=0; fi
    if ((misses >= MISSED)); then
      ENDED=dead WHY="$lost of $hosts workers did not answer $MISSED status polls in a row (host down, or the"
      WHY+=" process vanished)"; return 0
    fi
    now="$running running, $exited finished, $lost not answering"
    [ "$now" = "$last" ] || echo "[tpu_pod] $(date +%H:%M:%S) $NAME: $now"
    last=$now
    sleep "$POLL"
  done
}

cmd_logs() {
  local log="bpo_logs/$NAME.log"
  if [ "$FOLLOW" = 1 ]; then
    ssh_argv "${NODES[0]}" "${WORKER/#all/0}" "tail -n 100 -F $log"
    run "${SSH[@]}"
    return 0
  fi
  resolve_workers
  local dir=${LOGS_DIR:-$ROOT/logs/$NAME} i s failed=0 summary who
  run mkdir -p "$dir"
  for ((s = 0; s < SLICES; s++)); do
    for ((i = 0; i < WORKERS; i++)); do
      who=$(worker_label "$s" "$i")
      scp_node "${NODES[s]}" "${NODES[s]}:$log" "$dir/${who// /-}.log" "$i" ||
        { echo "$who: no log fetched" >&2; failed=1; }
    done
  done
  [ "$DRY" = 0 ] || return 0
  for ((s = 0; s < SLICES; s++)); do
    for ((i = 0; i < WORKERS; i++)); do
      who=$(worker_label "$s" "$i")
      [ -f "$dir/${who// /-}.log" ] || continue
      summary=$(runs_in_log "$dir/${who// /-}.log") || failed=1
      echo "$who: $summary"
    done
  done
  [ "$failed" = 0 ] || die "a worker failed (logs in $dir)"
}

worker_label() {  # SLICE WORKER: "worker W", or "slice S worker W" with several slices
  if ((SLICES > 1)); then echo "slice $1 worker $2"; else echo "worker $2"; fi
}

# How the runs in a worker's log (each after start_training's header) ended: "exit code RC" or "still running (no
# exit code yet)" for the last, then the earlier runs' codes ("none": the host went down first). Non-zero when the
# last run failed.
runs_in_log() {
  awk '/^\[tpu_pod\] run started / { n++; rc[n] = "" }
    /^\[bpo_jax\] exit code / { if (!n) n = 1; rc[n] = $NF }
    END {
      out = rc[n] == "" ? "still running (no exit code yet)" : "exit code " rc[n]
      for (i = 1; i < n; i++) earlier = earlier (i > 1 ? ", " : "") (rc[i] == "" ? "none" : rc[i])
      print out (n > 1 ? " (run " n " in the log; earlier runs: " earlier ")" : "")
      exit (rc[n] != "" && rc[n] != 0)
    }' "$1"
}

# On each worker: one line "HOST: running", "HOST: exited with code RC" or "HOST: no training started", then the
# log's last lines as "HOST| ..."; non-zero when the training failed there. `status` shows it, `watch` counts it.
state_cmd() {
  local log="$LOG$NAME"
  printf '%s' "h=\$(hostname); if pgrep -f $TRAIN_PAT >/dev/null; then echo \"\$h: running\"; tail -n 2 $log.log | sed \"s/^/\$h| /\"; elif [ -f $log.rc ]; then rc=\$(cat $log.rc); echo \"\$h: exited with code \$rc\"; tail -n 5 $log.log | sed \"s/^/\$h| /\"; [ \"\$rc\" = 0 ]; else echo \"\$h: no training started\"; fi"
}

cmd_status() {
  local state
  echo "+ $(q "${DESCRIBE[@]}")"
  if [ "$DRY" = 0 ]; then
    state=$("${DESCRIBE[@]}")
    echo "queued resource $NAME: ${state:-not found}"
    [ "$state" = ACTIVE ] || exit 1
  fi
  tpu_ssh all "$(state_cmd)" || die "a worker's training failed (see above; 'logs' fetches the logs)"
}
