#!/usr/bin/env bash
# One command: install (if needed) and run the whole test suite, GUI tests under Xvfb.
# System packages (Xvfb, Qt's X11 libraries) are installed when missing and this runs as root
# or with a password-less sudo; otherwise one line says what to install and the GUI tests are
# skipped with that reason (the rest of the suite still runs).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import napari_stem_strain, pytest, pytestqt" 2>/dev/null; then
    bash scripts/install.sh    # runs scripts/system-deps.sh too
else
    bash scripts/system-deps.sh || true
fi
. .venv/bin/activate
ruff check src tests benchmarks docs
lint-imports    # the layering contracts in pyproject.toml [tool.importlinter]
python -m pytest -p no:cacheprovider "$@"
