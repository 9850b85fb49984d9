#!/usr/bin/env bash
# Install diffkit into .venv, run the main job on the bundled demo catalog (thickness and
# tilt maps of the simulated SrTiO3 wedge, written to out/), then serve the dashboards on
# http://localhost:5006 (Ctrl-C to stop). Pass --no-serve for the headless job only.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # CPU wheel first, so no CUDA build is pulled
python -m pip install -q -e ".[all]"
if [ "${1:-}" = "--no-serve" ]; then
  diffkit demo --outdir out
else
  diffkit demo --outdir out --serve
fi
