#!/usr/bin/env bash
# Every GPU check of the project as one prepared script (docs/RELIABILITY.md, "GPU"): bf16 pretraining (1 GPU; TP=2
# and PP=2 with 2), MFU, one PPO iteration (1 and 2 ranks), the sampler on CUDA (CPU-equal tokens, host syncs
# independent of the number of rows) and a GPU Serve replica. Results: $OUT/pytest.log and one JSON row per
# measurement in $OUT/gpu_results.jsonl (for docs/BENCHMARKS.md).
#
# Needs a Python with a CUDA build of torch==2.13.0 and the project installed (PYTHON, default .venv/bin/python);
# nothing is downloaded. Bounded: the whole run stops after ${GPU_TIMEOUT_S:-540} s.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-.tmp/gpu}
mkdir -p "$OUT" .tmp/home
export RAYGPT_GPU_RESULTS="$OUT/gpu_results.jsonl" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
       TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HOME="$PWD/.tmp/home" \
       TMPDIR="$PWD/.tmp" RAY_TMPDIR=/tmp/raygpt-ray
: > "$RAYGPT_GPU_RESULTS"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_all.sh: $PYTHON has no CUDA torch (torch.cuda.is_available() is False); nothing was run" | tee "$OUT/pytest.log"
    exit 2
fi
timeout "${GPU_TIMEOUT_S:-540}" "$PYTHON" -m pytest -q -rA -s -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
echo "--- results ($RAYGPT_GPU_RESULTS)"; cat "$RAYGPT_GPU_RESULTS"
exit "$rc"
