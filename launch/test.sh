#!/usr/bin/env bash
# The test suite: same set-up as launch/local.sh plus the test extras, then pytest on 8 fake CPU
# devices with the HF hub offline, one pytest-xdist worker more than the cores. Extra arguments pass through to pytest;
# --fast first runs the fast tier only (no `slow` tests: pyproject.toml's markers).
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
bpo_setup requirements-test.txt
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
ruff check --quiet bpo_jax tests bench  # the lint (pyproject.toml [tool.ruff]): a finding fails the run
lint-imports --no-cache  # the layers as contracts (pyproject.toml [tool.importlinter]): a broken one fails the run
# One worker more than the cores (the multi-process and CLI tests wait on their children and on timeouts, so a
# worker per core leaves cores idle: 18.5 vs 20.6 minutes on 2 cores); each test file stays in one worker (its
# module fixtures are built once).
tier=()
if [ "${1:-}" = "--fast" ]; then
  shift
  tier=(-m "not slow")
fi
workers=$(( $(python -c "import os; print(len(os.sched_getaffinity(0)))") + 1 ))
# --durations: the slowest tests in the log, to keep the whole suite under ~15 minutes on 2 cores.
exec python -m pytest -q -n "$workers" --dist loadfile --durations=15 "${tier[@]}" "$@"
