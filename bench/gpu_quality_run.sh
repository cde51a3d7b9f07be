#!/usr/bin/env bash
# Issue 14 on one lent GPU in one device call (bench/LM_QUALITY.md): the char LM
# (§2: softmax, learned + local, random + local, softmax-wide; 3 seeds each),
# then MQAR (§1) in the time left (learned + local also after a 1000-step exact
# polynomial warm-up), and the results packed into at most 8 files.
#
#   bash bench/gpu_quality_run.sh DATA OUT BUDGET_S
#
# DATA: tinyshakespeare.txt; OUT: where the results go; BUDGET_S: seconds for
# the whole run (LM_SHARE percent of it for the LM). LM_SIZE and RECALL_SIZE
# override the sizes and RECALL_WARMUP the warm-up steps (a CPU smoke test uses
# tiny ones).
#
# One process at a time, with XLA's GPU autotuning on: measured on an H200
# (LM_QUALITY.md), a process alone steps 3-4x faster with autotuning than
# without, and processes side by side time-slice the GPU (a stacked 3-seed
# softmax step took 125 ms alone, 702 ms beside five other processes).
set -u
data=$1 out=$2 budget=$3
work=${WORK:-/tmp/gpu_quality}
rm -rf "$work" && mkdir -p "$work" "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LM_SIZE=${LM_SIZE:-"--context 1024 --batch-size 16 --layers 4 --heads 4 --dim 256 --wide-dim 272
  --steps 800 --warmup 100 --num-evals 8 --eval-batches 4"}
RECALL_SIZE=${RECALL_SIZE:-"--seqs 256 --pairs 8 --keys 32 --values 32 --layers 2 --dim 128
  --heads 2 --sketch-dim 32 --block-size 32 --steps 3000 --lrs 3e-3 1e-3"}
t0=$(date +%s)
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) > "$work/gpu.txt" 2>&1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
  'optax', optax.__version__, jax.devices())" >> "$work/gpu.txt" 2>&1

timeout $((budget * ${LM_SHARE:-75} / 100)) python3 bench/lm_quality.py --data "$data" $LM_SIZE \
  --lr 3e-3 --sketch-dim 32 --block-size 128 --seeds 0 1 2 \
  --variants softmax,learned+local,random+local,softmax-wide \
  --out-dir "$work" --tag lm_quality_gpu > "$work/lm.log" 2>&1
echo "lm_quality exited $?" >> "$work/lm.log"
left=$((budget - ($(date +%s) - t0)))
[ "$left" -gt 30 ] && timeout "$left" python3 bench/recall.py $RECALL_SIZE \
  --variants softmax,learned+local,local,random+local --out-dir "$work" --tag gpu > "$work/recall.log" 2>&1
left=$((budget - ($(date +%s) - t0)))   # learned + local after an exact polynomial warm-up
[ "$left" -gt 30 ] && timeout "$left" python3 bench/recall.py $RECALL_SIZE --polynomial-warmup ${RECALL_WARMUP:-1000} \
  --variants learned+local --out-dir "$work" --tag gpu_pw > "$work/recall_pw.log" 2>&1
cp "$work"/lm_quality_gpu.{json,md,png} "$work"/recall-gpu.{json,md} "$work"/recall-gpu_pw.json "$out"/ 2>/dev/null
tar czf "$out/logs.tar.gz" -C "$work" --exclude='*.png' .
ls -l "$out"
grep -v "^step" "$work/lm.log" | tail -n 30; cat "$work"/recall-gpu.md "$work"/recall-gpu_pw.md 2>/dev/null; cat "$work/gpu.txt"
