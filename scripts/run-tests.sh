#!/usr/bin/env bash
# Run the whole suite; pytest's exit status 5 ("no tests collected") is not a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ $rc = 5 ]; then echo "no tests collected"; rc=0; fi
exit $rc
