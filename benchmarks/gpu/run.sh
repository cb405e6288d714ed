#!/usr/bin/env bash
# The prepared GPU run (one H100/H200, no internet, one command of at most 10 minutes): sections in order of
# importance, each under `timeout` from what is left of a total budget, so the most important rows come first and a
# timeout loses only the row in flight (every script appends its CSV rows as they are produced).
#
#   bash benchmarks/gpu/run.sh                   all sections: sid-sd35m-1024 sid-others sid-zero3 sid-compiled kernels
#   bash benchmarks/gpu/run.sh sid-zero3 kernels only these, in this order
#
# Sections (docs/performance.md, docs/kernels.md):
#   sid-sd35m-1024  full SiD iterations, SD3.5-Medium at 1024 px: official-style loop (a), sid_fast eager (b),
#                   the fast path without and with torch.compile (c0, c)                          cap 300 s
#   sid-others      SD3.5-Medium 512 px, SANA-1.6B 1024 px, FLUX.1-dev and SD3.5-Large depth-cut: c0, b, a,
#                   variant by variant over the four rows                                          cap 200 s
#   sid-zero3       DeepSpeed ZeRO-3 at world size 1 against b (losses) and `sid-fast plan` (memory)   cap 170 s
#   sid-compiled    the fast path with torch.compile (c) for the rows of sid-others                    cap 240 s
#   kernels         every fused kernel against its reference, kernel and DiT-block timings             cap 470 s
# Environment: SID_FAST_GPU_BUDGET (seconds for all sections, default 560), OUT (results folder, default
# benchmarks/results/gpu-h200), SID_FAST_WHEELS (wheels to install first, default benchmarks/gpu/wheels).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out="${OUT:-benchmarks/results/gpu-h200}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
budget="${SID_FAST_GPU_BUDGET:-560}"
start=$SECONDS
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export SID_FAST_EXT_DIR="${SID_FAST_EXT_DIR:-/tmp/sid_fast_ext}"
log="$out/sid_step_log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_card.txt"
  $PY -V
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  command -v nvcc >/dev/null && echo "nvcc: $(nvcc --version | tail -1)" || echo "nvcc: absent (cpp backend CPU-only)"
} 2>&1 | tee -a "$log"
# The image has no diffusers, DeepSpeed or pydantic: wheels in $SID_FAST_WHEELS (docs/performance.md, "Carrying the
# wheels") go to a private folder put first on PYTHONPATH; the image's own packages stay untouched.
wheels="${SID_FAST_WHEELS:-benchmarks/gpu/wheels}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=/tmp/sid_fast_site
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed wheels: $(cd "$wheels" && ls *.whl | tr '\n' ' ')" | tee -a "$log"
  else
    echo "warning: installing the wheels failed" | tee -a "$log"
  fi
fi
$PY -c "import yaml, safetensors, tqdm" 2>/dev/null || echo "warning: yaml/safetensors/tqdm missing; bring wheels" | tee -a "$log"
$PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1 | tee -a "$log"
$PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$log"

failed=0
section() {  # section NAME CAP COMMAND...: run under timeout min(CAP, what is left), tee'd into the log
  local name=$1 cap=$2 left t status
  shift 2
  left=$(( budget - (SECONDS - start) ))
  t=$(( left < cap ? left : cap ))
  if (( t < 40 )); then
    echo "=== section $name: skipped (${left} s of the budget left)" | tee -a "$log"
    return
  fi
  echo "=== section $name: timeout ${t} s ($(( SECONDS - start )) s into the run)" | tee -a "$log"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
  echo "=== section $name: exit $status after $(( SECONDS - start )) s (124: timed out; rows so far are kept)" | tee -a "$log"
  (( status != 0 )) && failed=1
  return 0
}
sid() {  # sid NAME CAP SCRIPT-SECTION: the SiD step script with a deadline 12 s inside its timeout
  local name=$1 cap=$2 script_section=$3 left t
  left=$(( budget - (SECONDS - start) ))
  t=$(( left < cap ? left : cap ))
  section "$name" "$cap" $PY benchmarks/gpu/sid_step.py --section "$script_section" --out "$out" --deadline $(( t - 12 ))
}

sections=("$@")
(( ${#sections[@]} )) || sections=(sid-sd35m-1024 sid-others sid-zero3 sid-compiled kernels)
for s in "${sections[@]}"; do
  case "$s" in
    sid-sd35m-1024) sid "$s" 300 sd35m-1024 ;;
    sid-others)     sid "$s" 200 others ;;
    sid-zero3)      sid "$s" 170 zero3 ;;
    sid-compiled)   sid "$s" 240 compiled ;;
    kernels)
      left=$(( budget - (SECONDS - start) ))
      section kernels 470 $PY benchmarks/gpu/check_kernels.py --out "$out" --budget $(( (left < 470 ? left : 470) - 60 )) ;;
    *) echo "unknown section $s (known: sid-sd35m-1024 sid-others sid-zero3 sid-compiled kernels)"; failed=1 ;;
  esac
done
echo "=== SiD iterations ($out/sid_step.csv; docs/performance.md)" | tee -a "$log"
$PY benchmarks/gpu/sid_step.py --table --out "$out" 2>&1 | tee -a "$log"
echo "run.sh: $(( SECONDS - start )) s, exit $failed"
exit "$failed"
