#!/usr/bin/env bash
# Install everything the tests need, then run every check: ruff, mypy and the whole pytest
# suite (both ring implementations, real Xen peers, hostile scenarios).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k xenstore -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e '.[test]'
python3 -m xenpv peers fetch -q >/dev/null
python3 -m ruff check xenpv tests scripts
python3 -m mypy
python3 -m pytest -p no:cacheprovider "$@"
