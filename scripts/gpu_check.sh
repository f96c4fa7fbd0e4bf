#!/usr/bin/env bash
# The prepared device check (one H100 / H200, no network): installs the carried cp312 wheels
# (megatron-core: .whl/, made as the README says) and runs tools/bench/gpu_check.py, logging to $OUT.
#   bash scripts/gpu_check.sh [gpu_check args...]
set -uo pipefail
out=${OUT:-/tmp}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)" || exit 1
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_TIMEOUT:-420}" \
    python3 -W ignore::UserWarning -W ignore::FutureWarning -m tools.bench.gpu_check "$@" \
    2>&1 | tee "$out/gpu_check.log"
