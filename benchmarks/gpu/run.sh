#!/usr/bin/env bash
# The prepared GPU run of the kernels (docs/kernels.md): one H100/H200, at most 8 minutes, no internet.
#   bash benchmarks/gpu/run.sh            results appended to benchmarks/results/ (or to $OUT when set)
# Checks every kernel against its reference on CUDA (fp32, bf16, fp16), times them against the measured copy
# bandwidth, times the DiT block ops (eager / compile / triton, with a keep-or-drop verdict) and a DiT block
# forward+backward (eager / compile x attention backends, with and without the block kernels), prints a table last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
unset TRITON_INTERPRET
export SID_FAST_EXT_DIR="${SID_FAST_EXT_DIR:-/tmp/sid_fast_ext}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_card.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
command -v nvcc >/dev/null && echo "nvcc: $(nvcc --version | tail -1)" || echo "nvcc: absent (cpp backend CPU-only)"
# sid_fast imports yaml/safetensors/tqdm; the kernels need nothing else (no diffusers on the GPU image). Wheels put
# in benchmarks/gpu/wheels/ (or $SID_FAST_WHEELS), e.g. diffusers for the FLUX/SD3.5 block rows, are installed first.
wheels="${SID_FAST_WHEELS:-benchmarks/gpu/wheels}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  pip install --quiet --no-index --no-deps "$wheels"/*.whl && echo "installed wheels: $(cd "$wheels" && ls *.whl)"
fi
python -c "import yaml, safetensors, tqdm" 2>/dev/null || echo "warning: yaml/safetensors/tqdm missing; bring wheels"
timeout 470 python benchmarks/gpu/check_kernels.py --out "$out" 2>&1 | tee "$out/kernels_gpu_log.txt"
status=${PIPESTATUS[0]}
echo "exit status $status (0: all kernels conform; 1: a conformance failure, listed above; 2/124: crash/timeout)"
exit "$status"
