#!/usr/bin/env bash
# finegrain inside verl 0.9.1 (tests/integrations/test_verl.py, docs/verl.md), in its own
# virtualenv <repo>/.venv-verl: verl 0.9.1 needs transformers<5.11, the main environment has a
# newer one. The install is lean: CPU torch first, then verl and finegrain with --no-deps, then only
# what importing verl's algorithms, reward managers, agent loop and configs needs
# (.ci/verl-requirements.txt). The virtualenv is reused when it is already complete.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$PWD/.venv-verl"
PY="$VENV/bin/python"
STAMP="$VENV/.finegrain-verl-stamp"
WANT="$(sha256sum .ci/verl-requirements.txt .ci/verl.sh | sha256sum | cut -d' ' -f1)"

if [ ! -x "$PY" ]; then
  python -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q --no-deps "verl==0.9.1"
  "$PY" -m pip install -q -r .ci/verl-requirements.txt
  echo "$WANT" > "$STAMP"
fi
# finegrain from this checkout (editable, so the tests import the working tree)
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import torch, verl, transformers; print('verl', verl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

export FINEGRAIN_THREADS="${FINEGRAIN_THREADS:-1}"
# no extra -q: pyproject's addopts has one, and two would hide pytest's closing count line
FINEGRAIN_REQUIRE_VERL=1 "$PY" -m pytest -p no:cacheprovider -m verl tests/integrations/test_verl.py
