# Source this file: creates (once) and activates the project's virtual environment with every
# dependency, then installs this checkout in editable mode. Safe to run on a fresh machine.
# The environment lives outside the checkout, keyed by a hash of pyproject.toml, so fresh clones
# on the same machine reuse it; set ETC_DATA_VENV to choose another place.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON:-python3}"
_hash="$(cat "$_root/pyproject.toml" | sha256sum | cut -c1-12)"
_venv="${ETC_DATA_VENV:-$HOME/.cache/etc-data/venv-$("$_py" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')-$_hash}"
if [ ! -f "$_venv/.complete" ]; then
  # etc_data/_runs.c (setup.py) wants a C compiler and Python's headers; the install works without
  # them (a slower numpy path), but a fresh Debian machine gets them here, once, when we may install
  # packages (the editable reinstall below compiles it whenever a compiler is there)
  if ! command -v cc >/dev/null 2>&1 || [ ! -f "$("$_py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "[env] installing a C compiler and Python headers (apt-get) for etc_data/_runs.c" >&2
      apt-get install -y -q gcc libc6-dev python3-dev >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q gcc libc6-dev python3-dev >/dev/null 2>&1; } \
        || echo "[env] apt-get failed: etc_data/_runs.c will not be compiled (numpy fallback)" >&2
    else
      echo "[env] no C compiler or Python headers: etc_data/_runs.c will not be compiled (numpy fallback)" >&2
    fi
  fi
  echo "[env] creating $_venv (first run installs torch, prefect, ... this takes a few minutes)" >&2
  rm -rf "$_venv"
  "$_py" -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip
  "$_venv/bin/python" -m pip install -q -e "$_root[dev]"
  touch "$_venv/.complete"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
# this checkout (a fresh clone may live elsewhere than the one that built the environment)
python -m pip install -q --no-deps --no-build-isolation -e "$_root" >/dev/null 2>&1 \
  || python -m pip install -q --no-deps -e "$_root"
set +euo pipefail
