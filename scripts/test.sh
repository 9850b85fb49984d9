#!/usr/bin/env bash
# Install diffkit with everything it needs into .venv and run the test suite.
# Used verbatim by the README's test command and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # CPU wheel first, so no CUDA build is pulled
python -m pip install -q -e ".[all]"
if ! command -v chromium >/dev/null 2>&1; then     # browser tests drive Debian's chromium
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will be skipped"
fi
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit "$rc"
