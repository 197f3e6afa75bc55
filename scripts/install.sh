#!/usr/bin/env bash
# Create .venv (Python 3.11) and install napari-stem-strain with its test extras.
# torch is installed first from the CPU wheel (2.13.0) so that pip never pulls a multi-GB CUDA
# build; requirements/constraints.txt pins the versions the test suite was run with.
# System packages the GUI tests need (Xvfb, Qt's X11 libraries) come from scripts/system-deps.sh
# (installed when running as root or with a password-less sudo; otherwise it says what to install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh || true
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c requirements/constraints.txt -e ".[test]"
