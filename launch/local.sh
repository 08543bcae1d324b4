#!/usr/bin/env bash
# The main job on one machine (CPU by default). Creates .venv if missing, installs, then runs
# the CPU demo (BPO on SmolLM2-135M-Instruct, configs/smollm2_cpu_demo.yaml); extra arguments are
# key=value config overrides (e.g. `launch/local.sh total_steps=4 reference=sft`).
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
bpo_setup
exec python -m bpo_jax train --config configs/smollm2_cpu_demo.yaml "$@"
