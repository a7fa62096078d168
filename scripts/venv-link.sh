#!/usr/bin/env bash
# CI's stand-in for `python3` as make's PYTHON (see .ci/run): `-m venv DIR`
# makes DIR a symbolic link to the cached virtualenv MOLTBOT_VENV_SEED
# (created there first when missing), so the Makefile runs with a VENV that
# did not exist when make started, exactly as on a fresh clone, without
# reinstalling 5 GB. Every other call goes to python3.
set -euo pipefail
if [[ "${1:-}" == "-m" && "${2:-}" == "venv" && -n "${3:-}" ]]; then
  seed="${MOLTBOT_VENV_SEED:?set MOLTBOT_VENV_SEED to the cached virtualenv}"
  [[ -x "$seed/bin/python" ]] || python3 -m venv "$seed"
  mkdir -p "$(dirname "$3")"
  ln -sfn "$seed" "$3"
  exit 0
fi
exec python3 "$@"
