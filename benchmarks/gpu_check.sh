#!/usr/bin/env bash
# One self-checking GPU run of the trainer (issue 20); the steps are described in benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # e.g. --only tests,convmixer
#
# On the GPU machine, whose Python lacks some of etc-data's dependencies and cannot download them,
# the wheels that benchmarks/gpu_carry.sh put in carry/wheels are first installed into a private
# folder ($ETC_GPU_SITE, default /tmp/etc-gpu-site) put on PYTHONPATH; the repository itself is put
# on PYTHONPATH too (nothing is installed into the machine's Python). Then benchmarks/gpu_check.py
# runs every step and prints the summary table. Without CUDA it says so and exits 0 having run
# nothing. $PYTHON picks the interpreter (default python3).
set -u
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s.%N)}"   # the driver's --total counts from here
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
CARRY="${ETC_GPU_CARRY:-$REPO/carry}"
SITE="${ETC_GPU_SITE:-/tmp/etc-gpu-site}"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check.sh: no $PY on PATH: nothing was run (set \$PYTHON)"
  exit 0
fi
shopt -s nullglob
wheels=("$CARRY"/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ] && ! "$PY" -c "import simplejpeg, cryptography" >/dev/null 2>&1; then
  echo "gpu_check.sh: installing ${#wheels[@]} carried wheels into $SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}"; then
    echo "gpu_check.sh: pip failed; unpacking the wheels into $SITE instead"
    "$PY" - "$SITE" "${wheels[@]}" <<'PY'
import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])
PY
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 0
exec "$PY" benchmarks/gpu_check.py --carry "$CARRY" "$@"
