#!/usr/bin/env bash
# Issue 14 on one lent GPU in one device call (bench/LM_QUALITY.md): the char LM
# (§2: softmax, softmax-wide, learned + local, random + local, 3 seeds each,
# seeds stacked, --time-budget) and MQAR (§1) beside it, then the results
# packed into at most 8 files.
#
#   bash bench/gpu_quality_run.sh DATA OUT BUDGET_S
#
# DATA: tinyshakespeare.txt; OUT: where the results go; BUDGET_S: seconds for
# the whole run (the LM's --time-budget; MQAR is stopped at the same time).
# LM_SIZE and RECALL_SIZE override the sizes (a CPU smoke test uses tiny ones).
set -u
data=$1 out=$2 budget=$3
work=${WORK:-/tmp/gpu_quality}
rm -rf "$work" && mkdir -p "$work" "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Many compiles at once with XLA's GPU autotuning took minutes (LM_QUALITY.md).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
LM_SIZE=${LM_SIZE:-"--context 1024 --batch-size 16 --layers 4 --heads 4 --dim 256 --wide-dim 272
  --steps 3000 --warmup 100 --num-evals 10 --eval-batches 4"}
RECALL_SIZE=${RECALL_SIZE:-"--seqs 256 --pairs 8 --keys 32 --values 32 --layers 2 --dim 128
  --heads 2 --sketch-dim 32 --block-size 32 --steps 3000 --lrs 1e-3"}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) > "$work/gpu.txt" 2>&1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
  'optax', optax.__version__, jax.devices())" >> "$work/gpu.txt" 2>&1

timeout "$budget" python3 bench/recall.py $RECALL_SIZE --variants softmax,local \
  --out-dir "$work" --tag gpu_a > "$work/recall_a.log" 2>&1 &
timeout "$budget" python3 bench/recall.py $RECALL_SIZE --variants learned+local,random+local \
  --out-dir "$work" --tag gpu_b > "$work/recall_b.log" 2>&1 &
python3 bench/lm_quality.py --parallel --stack-seeds --time-budget "$budget" --data "$data" \
  $LM_SIZE --lr 3e-3 --sketch-dim 32 --block-size 128 --seeds 0 1 2 \
  --variants softmax,learned+local,random+local,softmax-wide \
  --out-dir "$work" --tag lm_quality_gpu_long > "$work/lm.log" 2>&1
echo "lm_quality exited $?" >> "$work/lm.log"
wait
recall_parts=$(ls "$work"/recall-gpu_[ab].json 2>/dev/null)
[ -n "$recall_parts" ] && python3 bench/recall.py --merge $recall_parts --out-dir "$work" --tag gpu \
  >> "$work/recall_a.log" 2>&1
cp "$work"/lm_quality_gpu_long.{json,md,png} "$work"/recall-gpu.{json,md,png} "$out"/ 2>/dev/null
tar czf "$out/logs.tar.gz" -C "$work" --exclude='*.png' . 
ls -l "$out"
tail -n 25 "$work/lm.log"; cat "$work"/recall-gpu.md 2>/dev/null; cat "$work/gpu.txt"
