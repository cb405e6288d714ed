#!/usr/bin/env bash
# The long ShapesWorld runs behind docs/shapes.md "Long runs and learning curves": each a
# launchers/shapes_reference.py run with a learning curve every 100 iterations (EMA and raw weights), checkpointed
# every 100 iterations, in the background at one thread each. Rerun the same command to resume a run where it stopped
# (in the next session too); ITER=N (or CONTROL_ITER / FU2_ITER) raises its length.
#
#   launchers/shapes_long_runs.sh sid2a-1step sid2a-4step        # SiD²ₐ from the H200 data-free generators
#   launchers/shapes_long_runs.sh free-1step sid2a-fu2-1step      # its data-free control; 2 fake updates per step
#   launchers/shapes_long_runs.sh sid2a-1step-seed1 sid2a-fu2-1step-seed1   # the 1-vs-2 comparison, training seed 1
#   python benchmarks/studies/shapes_curves.py --run "SiD²ₐ 1-step=runs/shapes-long/sid2a-1step/curve.jsonl" ...
#
# Every run starts from the data-free generators distilled on a lent H200 (850 / 180 iterations of the reference
# preset) that sid_fast shipped until December 2026; they are taken from git (commit a303e8b) into
# runs/shapes-long/keep/. Logs: runs/shapes-long/NAME.log; curve, scores, best generators: runs/shapes-long/NAME/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SID_FAST_VENV:-$HOME/.cache/sid_fast/venv-$(sha256sum requirements.txt | cut -c1-16)}"
OUT=runs/shapes-long
mkdir -p "$OUT/keep"
for k in 1 4; do
  start="$OUT/keep/shipped-h200-sid-${k}step.safetensors"
  [ -f "$start" ] || git show "a303e8b:sid_fast/assets/shapes/sid-${k}step.safetensors" > "$start"
done
BASE="train.batch_size=16 optim.lr_generator=2e-5 train.ckpt_every=100 train.keep_checkpoints=3 train.log_every=50
      train.progress=false health.tensorboard=false"
AIDED="adversarial.enabled=true adversarial.generator_warmup_images=1600 adversarial.adversarial_from_images=2400
       train.fake_warmup_iters=0"
# two fake-score updates per generator update (the recipe: one); generator from iteration 50, L_adv from 75
FU2="train.fake_updates=2 adversarial.enabled=true adversarial.generator_warmup_images=2400
     adversarial.adversarial_from_images=3600 train.fake_warmup_iters=0"

launch() {  # name K label settings...
  local name=$1 k=$2 label=$3
  shift 3
  if pgrep -f -- "--out $OUT/$name --" >/dev/null; then
    echo "$name is already running: not started twice" >&2
    return 0
  fi
  mkdir -p "$OUT/$name"
  # the teacher's rows are the same for every run (same prompts, noise and seed): copy them when a run has none
  if [ ! -f "$OUT/$name/reference.jsonl" ] && ls "$OUT"/*/reference.jsonl >/dev/null 2>&1; then
    grep -h '"name": "teacher Euler' "$(ls "$OUT"/*/reference.jsonl | head -1)" > "$OUT/$name/reference.jsonl" || true
  fi
  OMP_NUM_THREADS=1 nohup nice -n 5 "$VENV/bin/python" launchers/shapes_reference.py --steps "$k" --label "$label" \
    --out "$OUT/$name" --curve-every 100 --curve-raw --threads 1 \
    --set $BASE "$@" "adversarial.init_generator=$OUT/keep/shipped-h200-sid-${k}step.safetensors" \
    >> "$OUT/$name.log" 2>&1 &
  echo "started $name (pid $!): tail -f $OUT/$name.log"
}

for name in "$@"; do
  case "$name" in
    sid2a-1step) launch "$name" 1 sid2a "train.iterations=${ITER:-3000}" $AIDED ;;
    sid2a-4step) launch "$name" 4 sid2a "train.iterations=${ITER:-3000}" $AIDED ;;
    # SiD²ₐ's control: continued data-free SiD from the same start, the generator's first update at iteration 50
    free-1step) launch "$name" 1 free "train.iterations=${CONTROL_ITER:-1000}" train.fake_warmup_iters=50 ;;
    sid2a-fu2-1step) launch "$name" 1 sid2a-fu2 "train.iterations=${FU2_ITER:-1000}" $FU2 ;;
    # replicates of the fake-update comparison with another training seed (same start, evaluation prompts and noise)
    sid2a-1step-seed1) launch "$name" 1 sid2a-seed1 "train.iterations=${ITER:-1000}" train.seed=1 $AIDED ;;
    sid2a-fu2-1step-seed1) launch "$name" 1 sid2a-fu2-seed1 "train.iterations=${FU2_ITER:-1000}" train.seed=1 $FU2 ;;
    *) echo "unknown run $name (sid2a-1step, sid2a-4step, free-1step, sid2a-fu2-1step, sid2a-1step-seed1," \
            "sid2a-fu2-1step-seed1)" >&2; exit 2 ;;
  esac
done
