#!/usr/bin/env bash
# One command: install (if needed) and run the whole test suite, GUI tests under Xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import napari_stem_strain, pytest, pytestqt" 2>/dev/null; then
    bash scripts/install.sh
fi
. .venv/bin/activate
ruff check src tests benchmarks docs
python -m pytest -p no:cacheprovider "$@"
