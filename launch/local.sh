#!/usr/bin/env bash
# The main job on one machine (CPU by default). Creates .venv if missing, installs, then runs
# the CPU demo; extra arguments pass through to the program (e.g. `launch/local.sh --loss-type ipo --beta 1.0`).
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
bpo_setup
exec python -m bpo_jax toy "$@"
