#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs pytest.
# Real-data tests read ../shared/data (relative to the checkout) or $ETC_DATA_SHARED.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
export PYTHONHASHSEED=0 MPLBACKEND=Agg
# test files are spread over one process per core (pytest-xdist; a file's tests stay together, so
# module fixtures are built once): most of the suite waits on servers and subprocesses
rc=0
python -m pytest -q -p no:cacheprovider -n "${ETC_DATA_TEST_PROCESSES:-auto}" --dist loadfile "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "FAILED: pytest collected no tests (exit 5) - that is not a pass" >&2
  exit 1
fi
exit "$rc"
