#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the cuda-marked tests, then the CC-ST-AE speed benchmark
# on the GPU and on the CPU (same machine, same data), in well under 5 minutes.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; uses .venv if present)
# Record the two patterns/s figures (and the GPU's name) in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, \
'CUDA:', torch.cuda.get_device_name(0) if ok else 'none'); sys.exit(0 if ok else 1)" \
    || { echo "gpu_check: torch sees no CUDA GPU here; nothing to check" >&2; exit 1; }
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
timeout 60 "$PY" benchmarks/bench_ccstae.py speed --device cuda
timeout 60 "$PY" benchmarks/bench_ccstae.py speed --device cpu --threads "$(nproc)"
