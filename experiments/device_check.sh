#!/usr/bin/env bash
# Accelerator check in one go (< 5 minutes): make a CUDA jax available, then run
# experiments/device_check.py (featuriser at k = 5, 20, 100 and training throughput),
# which writes one JSON.
#
#   experiments/device_check.sh OUT.json [device_check.py flags, e.g. --corpus=cells.npz]
#   experiments/device_check.sh OUT.json --cpu --quick     # CPU smoke run, installs nothing
#
# CUDA jax, in order: the installed jax if it already sees a GPU; wheels from a `.whl/`
# folder in or beside the repository root (pip --no-index: the lending machines have no
# network); else `pip install -U "jax[cuda12]"` from the package index. vesin (for its
# CUDA path) and gemmi are installed from `.whl/` when there, never required.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 OUT.json [--cpu] [device_check.py flags]" >&2
  exit 2
fi
OUT=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
CPU=0
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--cpu" ]]; then CPU=1; else ARGS+=("$arg"); fi
done

has_gpu() {
  "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' >/dev/null 2>&1
}

if [[ $CPU == 1 ]]; then
  export JAX_PLATFORMS=cpu
  echo "device_check: CPU mode (installing nothing)"
elif has_gpu; then
  echo "device_check: using the installed jax (it sees a GPU)"
else
  for wheels in "$REPO/.whl" "$REPO/../.whl"; do
    if [[ -d "$wheels" ]]; then
      echo "device_check: installing jax[cuda12] from $wheels (no index)"
      "$PY" -m pip install -q --no-index --find-links "$wheels" -U "jax[cuda12]" || true
      for optional in vesin gemmi; do
        "$PY" -m pip install -q --no-index --find-links "$wheels" "$optional" >/dev/null 2>&1 || true
      done
      has_gpu && break
    fi
  done
  if ! has_gpu; then
    echo "device_check: installing jax[cuda12] from the package index"
    "$PY" -m pip install -q -U "jax[cuda12]" || true
  fi
  has_gpu || echo "device_check: WARNING no GPU visible to jax; measuring on $("$PY" -c 'import jax; print(jax.default_backend())')"
fi

cd "$REPO"
exec timeout 280 "$PY" experiments/device_check.py --out="$OUT" ${ARGS[@]+"${ARGS[@]}"}
