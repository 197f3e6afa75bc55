#!/usr/bin/env bash
# One command: install everything, then run the main job on built-in sample data
# (simulate a WS2-like polycrystal, map it with CC-ST-AE and py4DSTEM, compare with ground truth).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
stem-strain demo --out-dir demo_output
