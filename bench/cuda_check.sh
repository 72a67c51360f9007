#!/usr/bin/env bash
# For a machine with a CUDA GPU (see DEVELOPERS.md / the device tool): the CUDA tests, then the
# decode benchmark on a small random-init model, bf16 and fp32. About 2-4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
$PY -m pytest -q -m cuda tests/test_cuda.py
for dtype in bf16 fp32; do
  $PY bench/bench_decode.py --device cuda --dtype $dtype --train-steps 100 --max-new-tokens 64 --batch-sizes 1 16
done
