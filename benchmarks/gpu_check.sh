#!/usr/bin/env bash
# For a maintainer with a CUDA GPU (about 10 minutes on one 24 GB+ card; the 7B arm needs ~17 GB of GPU memory
# and ~15 GB of disk for its random-weight checkpoint under /tmp/holitom-bench):
#   1. the GPU smoke suite (pytest -m gpu): default path, --compare-baseline and the inner stage, bf16 and fp16;
#   2. the side-by-side benchmark (baseline and every preset on one prepared video) at LLaVA-OV-0.5B and 7B
#      shapes, random weights. Tables go to benchmarks/out/ (JSON + markdown), to copy into docs/benchmarks.md.
# Run from a clone with the project installed (pip install -e ".[dev]" with your CUDA torch):
#   bash benchmarks/gpu_check.sh             # DTYPE=float16 for GPUs without bf16; FRAMES=16 for a quicker run
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE="${DTYPE:-bfloat16}"
FRAMES="${FRAMES:-32}"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device: torch.cuda.is_available() is False")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
echo "== 1/3 GPU smoke suite"
python -m pytest -m gpu -q -rs -p no:cacheprovider
echo "== 2/3 side by side at LLaVA-OV-0.5B shapes, ${FRAMES} frames, ${DTYPE}"
python -m benchmarks.e2e --shape 0.5b --device cuda --dtype "$DTYPE" --frames "$FRAMES" --repeats 3 \
    --new-tokens 64 --name "gpu_e2e_0.5b"
echo "== 3/3 side by side at LLaVA-OV-7B shapes, ${FRAMES} frames, ${DTYPE}"
python -m benchmarks.e2e --shape 7b --device cuda --dtype "$DTYPE" --frames "$FRAMES" --repeats 3 \
    --new-tokens 64 --presets fastest balanced --name "gpu_e2e_7b"
echo "Done: results in benchmarks/out/gpu_e2e_0.5b.* and benchmarks/out/gpu_e2e_7b.*"
